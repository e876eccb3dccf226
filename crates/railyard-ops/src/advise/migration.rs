//! Advice written as diesel migrations.

use std::path::{Path, PathBuf};

use super::Advice;
use crate::error::Error;

/// One migration per verified index (`CREATE INDEX CONCURRENTLY` must run
/// alone, outside a transaction), versions one second apart from now.
pub(super) fn write(advice: &Advice, dir: &Path, name: &str) -> Result<Vec<PathBuf>, Error> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(Error::Advice(format!(
            "the migration name {name:?} (--migration): use lowercase letters, digits and _ (for example add_advised_indexes)"
        )));
    }
    let indexes: Vec<_> = advice.indexes.iter().filter(|i| i.verified).collect();
    if indexes.is_empty() {
        return Err(Error::Advice(
            "no verified index advice to write (run with hypopg installed; unverified advice is never written)"
                .to_owned(),
        ));
    }
    let now = chrono::Utc::now();
    let io = |context: String| move |source| Error::Io { context, source };
    let mut written = Vec::new();
    for (k, index) in indexes.iter().enumerate() {
        let at = now + chrono::Duration::seconds(k as i64);
        let suffix = if indexes.len() == 1 {
            String::new()
        } else {
            format!("_{}", k + 1)
        };
        let path = dir.join(format!("{}_{name}{suffix}", at.format("%Y-%m-%d-%H%M%S")));
        if path.exists() {
            return Err(Error::Advice(format!(
                "{} exists already; nothing was written over it",
                path.display()
            )));
        }
        std::fs::create_dir_all(&path).map_err(io(format!("creating {}", path.display())))?;
        let helps: String = index
            .helps
            .iter()
            .map(|h| match h.cost_after {
                Some(a) => format!(
                    "-- estimated cost {:.1} -> {:.1}: {}\n",
                    h.cost_before, a, h.statement
                ),
                None => format!("-- {}\n", h.statement),
            })
            .collect();
        let files = [
            (
                "up.sql",
                format!(
                    "-- Written by `railyard advise`: proved with a hypothetical index.\n{helps}{}\n",
                    index.create
                ),
            ),
            ("down.sql", format!("{}\n", index.drop)),
            (
                "metadata.toml",
                "# CREATE INDEX CONCURRENTLY cannot run inside a transaction.\nrun_in_transaction = false\n"
                    .to_owned(),
            ),
        ];
        for (file, text) in files {
            let p = path.join(file);
            std::fs::write(&p, text).map_err(io(format!("writing {}", p.display())))?;
        }
        written.push(path);
    }
    Ok(written)
}
