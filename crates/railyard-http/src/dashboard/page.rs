//! The page: `dashboard.html`, compiled in, with the verdict and its reasons
//! written in.

use railyard::observe::HealthStatus;
use railyard_ops::watch::Sample;

/// The page, with its CSS and JS inline.
const PAGE: &str = include_str!("../dashboard.html");
/// Where the server writes the verdict into the page (before any script runs).
const VERDICT_MARK: &str = "<!--railyard:verdict-->";
/// Where the server writes the verdict's class.
const CLASS_MARK: &str = "v-railyard-class";
/// Where the server writes the reasons.
const REASONS_MARK: &str = "<!--railyard:reasons-->";

/// Reasons written into the page itself at most.
const PAGE_REASONS: usize = 20;

/// The page with the verdict and its reasons written in, so that what is
/// wrong shows before (and without) the script.
pub(crate) fn render_page(latest: Option<&Sample>) -> String {
    let (verdict, class) = match latest.map(|s| s.status) {
        None => ("waiting", "v-unknown"),
        Some(HealthStatus::Healthy) => ("healthy", "v-healthy"),
        Some(HealthStatus::Degraded) => ("degraded", "v-degraded"),
        Some(_) => ("unhealthy", "v-unhealthy"),
    };
    let mut reasons = String::new();
    match latest {
        None => reasons.push_str("<li class=\"muted\">waiting for the first sample</li>"),
        Some(s) if s.reasons.is_empty() => {
            reasons.push_str("<li class=\"muted\">nothing: every check is healthy</li>");
        }
        Some(s) => {
            for r in s.reasons.iter().take(PAGE_REASONS) {
                let status = match r.status {
                    HealthStatus::Healthy => "healthy",
                    HealthStatus::Degraded => "degraded",
                    _ => "unhealthy",
                };
                reasons.push_str(&format!(
                    "<li class=\"s-{status}\"><b>{}</b> {}</li>",
                    escape_html(&r.name),
                    escape_html(&r.reason)
                ));
            }
        }
    }
    PAGE.replacen(VERDICT_MARK, verdict, 1)
        .replacen(CLASS_MARK, class, 1)
        .replacen(REASONS_MARK, &reasons, 1)
}

/// Text made safe inside an element or a quoted attribute.
pub(crate) fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dashboard::fixtures::sample;
    use railyard::observe::HealthCheck;

    #[test]
    fn escaping_leaves_no_markup() {
        assert_eq!(
            escape_html(r#"a < b && c > 'd' "e""#),
            "a &lt; b &amp;&amp; c &gt; &#39;d&#39; &quot;e&quot;"
        );
        assert_eq!(
            escape_html("<script>alert(1)</script>"),
            "&lt;script&gt;alert(1)&lt;/script&gt;"
        );
        assert_eq!(escape_html("plain ü"), "plain ü");
    }

    #[test]
    fn the_page_carries_the_verdict_and_escaped_reasons() {
        let waiting = render_page(None);
        assert!(waiting.contains(r#"id="verdict" class="v-unknown">waiting<"#));
        let mut s = (*sample(1, 0)).clone();
        s.status = HealthStatus::Degraded;
        s.reasons = vec![HealthCheck::new(
            "plans",
            HealthStatus::Degraded,
            "SELECT * FROM t WHERE a < $1 AND b = '?'</li><script>",
        )];
        let page = render_page(Some(&s));
        assert!(page.contains(r#"id="verdict" class="v-degraded">degraded<"#));
        assert!(page.contains("a &lt; $1 AND b = &#39;?&#39;&lt;/li&gt;&lt;script&gt;"));
        assert!(!page.contains("<!--railyard:"));
        assert!(!page.contains(CLASS_MARK));
    }

    #[test]
    fn the_page_is_self_contained_and_small() {
        assert!(PAGE.len() < 30 * 1024, "{} bytes", PAGE.len());
        for needle in [
            "http://",
            "https://",
            "<script src",
            "<link",
            "@import",
            "url(",
        ] {
            assert!(!PAGE.contains(needle), "the page holds {needle}");
        }
        for id in [
            "id=\"verdict\"",
            "id=\"reasons\"",
            "id=\"alerts\"",
            "id=\"replicas\"",
            "id=\"pools\"",
            "id=\"charts\"",
            "id=\"statements\"",
            "id=\"migrations\"",
        ] {
            assert!(PAGE.contains(id), "{id}");
        }
        for mark in [VERDICT_MARK, CLASS_MARK, REASONS_MARK] {
            assert_eq!(PAGE.matches(mark).count(), 1, "{mark}");
        }
    }
}
