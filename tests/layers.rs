//! The module graph runs one way. Each top-level module of `src/` may use only
//! the modules listed before it in `LAYERS`; a use of a later one (or a detour
//! through a root re-export such as `crate::Database`) fails this test, naming
//! the file and the line. `cargo test --test layers -- --nocapture` prints the
//! graph.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// Lowest first. `main.rs` (the binary) and `schema.rs` (generated) use the
/// crate from outside and are not layers.
const LAYERS: [&str; 16] = [
    "error", "config", "local", "backup", "conn", "exec", "route", "migrate", "observe",
    "database", "retain", "advise", "watch", "alert", "http", "testing",
];

fn files(module: &str, src: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let single = src.join(format!("{module}.rs"));
    if single.exists() {
        out.push(single);
    }
    let mut stack = vec![src.join(module)];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The module names a line refers to as `crate::name`, outside comments and
/// string literals.
fn crate_refs(line: &str) -> Vec<String> {
    let code = line.trim_start();
    if code.starts_with("//") {
        return Vec::new();
    }
    // Drop string literals and trailing comments, crudely but enough for `use`.
    let mut text = String::new();
    let mut in_str = false;
    let mut prev = ' ';
    for ch in code.chars() {
        if ch == '"' && prev != '\\' {
            in_str = !in_str;
        } else if !in_str {
            if ch == '/' && prev == '/' {
                text.pop();
                break;
            }
            text.push(ch);
        }
        prev = ch;
    }
    let mut refs = Vec::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `railyard_crate::`
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            refs.push(name);
        }
    }
    // `use crate::{a::X, b::Y}`
    if let Some(i) = text.find("crate::{") {
        let inner = &text[i + "crate::{".len()..];
        for part in inner.split([',', '{', '}']) {
            let name: String = part
                .trim()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && part.trim().contains("::") {
                refs.push(name);
            }
        }
    }
    refs
}

#[test]
fn lower_modules_never_use_higher_ones() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut edges: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut violations = Vec::new();
    for (rank, module) in LAYERS.iter().enumerate() {
        let module_files = files(module, &src);
        assert!(
            !module_files.is_empty(),
            "layer {module} has no source in src/"
        );
        for file in module_files {
            let text = fs::read_to_string(&file).unwrap();
            for (n, line) in text.lines().enumerate() {
                for name in crate_refs(line) {
                    if name == *module {
                        continue;
                    }
                    let where_ = format!("{}:{}", file.display(), n + 1);
                    match LAYERS.iter().position(|l| *l == name) {
                        Some(r) if r < rank => {
                            *edges.entry((module.to_string(), name)).or_default() += 1;
                        }
                        Some(_) => violations.push(format!(
                            "{where_}: `{module}` uses `{name}`, a higher layer: {}",
                            line.trim()
                        )),
                        None if name.chars().next().is_some_and(char::is_uppercase) => {
                            violations.push(format!(
                                "{where_}: `{module}` reaches `crate::{name}` through the root; name its module: {}",
                                line.trim()
                            ))
                        }
                        None => violations.push(format!(
                            "{where_}: `{module}` uses `crate::{name}`, which is not a layer (add it to LAYERS in tests/layers.rs)",
                        )),
                    }
                }
            }
        }
    }
    println!("uses of a lower module, by module (lines):");
    for ((from, to), n) in &edges {
        println!("  {from:>9} -> {to:<9} {n}");
    }
    assert!(
        violations.is_empty(),
        "the module graph must run one way (lowest first: {}):\n{}",
        LAYERS.join(", "),
        violations.join("\n")
    );
}

#[test]
fn the_reference_parser_sees_uses() {
    assert_eq!(crate_refs("use crate::conn::Conn;"), ["conn"]);
    assert_eq!(
        crate_refs("use crate::{conn::Conn, error::Error};"),
        ["conn", "error"]
    );
    assert_eq!(
        crate_refs("    // crate::database in a comment"),
        Vec::<String>::new()
    );
    assert_eq!(
        crate_refs(r#"let s = "crate::database";"#),
        Vec::<String>::new()
    );
    assert_eq!(
        crate_refs("x(crate::route::Floor::Any) // crate::http"),
        ["route"]
    );
}
