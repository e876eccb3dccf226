//! The module and crate graphs run one way.
//!
//! - Each top-level module of the core (`crates/railyard/src`) may use only
//!   the modules listed before it in `LAYERS`; a use of a later one (or a
//!   detour through a root re-export such as `crate::Database`) fails,
//!   naming the file and the line.
//! - Each crate of the workspace may depend on (and name in its sources) only
//!   the workspace crates listed before it in `CRATES`: the core names none,
//!   and no product crate reaches another product that sits above it.
//!
//! `cargo test --test layers -- --nocapture` prints both graphs.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// The core's modules, lowest first.
const LAYERS: [&str; 8] = [
    "error", "config", "conn", "exec", "route", "migrate", "observe", "database",
];

/// The workspace's crates, lowest first, with their directories. The root
/// package (the CLI, its integration suite and benches) is last.
const CRATES: [(&str, &str); 8] = [
    ("railyard-macros", "crates/railyard-macros"),
    ("railyard", "crates/railyard"),
    ("railyard-local", "crates/railyard-local"),
    ("railyard-events", "crates/railyard-events"),
    ("railyard-ops", "crates/railyard-ops"),
    ("railyard-test", "crates/railyard-test"),
    ("railyard-http", "crates/railyard-http"),
    ("railyard-cli", "."),
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
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/railyard/src");
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

/// The workspace crates a manifest's `[dependencies]` (and
/// `[dev-dependencies]`) name.
fn workspace_deps(manifest: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_deps = false;
    for line in manifest.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            in_deps = l == "[dependencies]" || l == "[dev-dependencies]";
            continue;
        }
        if !in_deps {
            continue;
        }
        let name = l.split(['=', ' ']).next().unwrap_or("");
        if CRATES.iter().any(|(c, _)| *c == name) {
            out.push(name.to_owned());
        }
    }
    out
}

#[test]
fn crates_depend_only_on_lower_crates() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut violations = Vec::new();
    println!("workspace dependencies, by crate:");
    for (rank, (name, dir)) in CRATES.iter().enumerate() {
        let manifest = fs::read_to_string(root.join(dir).join("Cargo.toml")).unwrap();
        let deps = workspace_deps(&manifest);
        println!("  {name:>16} -> {}", deps.join(", "));
        for d in &deps {
            let r = CRATES.iter().position(|(c, _)| c == d).unwrap();
            if r >= rank {
                violations.push(format!("{name} depends on {d}, which is not below it"));
            }
        }
        // Sources name only crates the manifest allows: a path such as
        // `railyard_ops::` in the core would not build anyway, but a doc
        // link or a macro's expansion might slip through.
        // The macro's expansion names the crate that re-exports it, by
        // design; the root package names every crate.
        if *dir == "." || *name == "railyard-macros" {
            continue;
        }
        for file in files("", &root.join(dir).join("src")) {
            let text = fs::read_to_string(&file).unwrap();
            for (n, line) in text.lines().enumerate() {
                if line.trim_start().starts_with("//") {
                    continue;
                }
                // A message may tell the user to reach for a higher crate.
                let line: String = line.split('"').step_by(2).collect();
                for (higher, _) in &CRATES[rank..] {
                    let path = format!("{}::", higher.replace('-', "_"));
                    if *higher != *name && line.contains(&path) {
                        violations.push(format!(
                            "{}:{}: {name} names {higher}, a crate above it",
                            file.display(),
                            n + 1
                        ));
                    }
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "the crate graph must run one way (lowest first: {}):\n{}",
        CRATES.map(|(c, _)| c).join(", "),
        violations.join("\n")
    );
}
