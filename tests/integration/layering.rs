//! The layering rule of `docs/ARCHITECTURE.md`, checked on the source text: every top-level
//! module of `src/` has a rank, and may import (`crate::…`) only modules of a lower rank, so
//! no import cycle between modules can exist and nothing imports upwards. The store is
//! reached only by its owners. Runs in CI with every `cargo test`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Lowest first. A module may use only modules of a strictly lower rank.
const RANKS: &[(&str, u32)] = &[
    // Leaves: no imports from the crate.
    ("clock", 0),
    ("plumbing", 0),
    ("sfu", 0),
    ("cli", 0),
    ("config", 1),
    ("metrics", 1),
    ("secrets", 2),
    ("store", 2),
    ("net", 3),
    ("turn", 3),
    ("matrix", 3),
    ("calls", 4),
    ("auth", 5),
    ("signal", 6),
    ("cascade", 6),
    ("bridge", 6),
    ("webhook", 6),
    ("http", 7),
    ("serve", 8),
];

/// Who may import `store`: its owners, and `serve`, which opens it.
const STORE_OWNERS: &[&str] = &["calls", "auth", "serve"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`src/calls/delayed.rs` → `calls`).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let first = rel.components().next().expect("component");
    first
        .as_os_str()
        .to_string_lossy()
        .trim_end_matches(".rs")
        .to_owned()
}

/// The top-level modules a source text names as `crate::<module>`, comments left out.
fn imports(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.push((n + 1, name));
            }
            rest = after;
        }
        // `use crate::{a, b::c}` groups.
        if let Some(i) = code.find("crate::{") {
            for part in code[i + "crate::{".len()..].split(',') {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.push((n + 1, name));
                }
            }
        }
    }
    found
}

/// Every violation of the rules in the tree at `src`.
pub fn violations(src: &Path) -> Vec<String> {
    let ranks: BTreeMap<&str, u32> = RANKS.iter().copied().collect();
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut problems = Vec::new();
    for file in files {
        let module = module_of(src, &file);
        if module == "lib" || module == "main" {
            continue;
        }
        let Some(&rank) = ranks.get(module.as_str()) else {
            problems.push(format!(
                "{}: module `{module}` has no rank in tests/integration/layering.rs (add it, \
                 and to the table in docs/ARCHITECTURE.md)",
                file.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("read file");
        for (line, target) in imports(&text) {
            if target == module {
                continue;
            }
            let Some(&target_rank) = ranks.get(target.as_str()) else {
                continue; // `crate::Foo` re-exports of lib.rs, macros
            };
            if target_rank >= rank {
                problems.push(format!(
                    "{}:{line}: `{module}` (rank {rank}) imports `{target}` (rank \
                     {target_rank}): imports must point down",
                    file.display()
                ));
            }
            if target == "store" && !STORE_OWNERS.contains(&module.as_str()) {
                problems.push(format!(
                    "{}:{line}: `{module}` reaches the store; only {STORE_OWNERS:?} may",
                    file.display()
                ));
            }
        }
    }
    problems
}

#[test]
fn imports_point_down_and_only_owners_reach_the_store() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let problems = violations(&src);
    assert!(
        problems.is_empty(),
        "layering violations:\n{}",
        problems.join("\n")
    );
}

#[test]
fn an_upward_import_is_caught() {
    // A scratch copy of a tiny tree: `sfu` (rank 0) importing `calls` (rank 4), and `http`
    // reaching the store.
    let dir = std::env::temp_dir().join(format!("conclave-layering-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("sfu")).unwrap();
    std::fs::write(
        dir.join("sfu/mod.rs"),
        "use crate::sfu::ids::RoomName;\nuse crate::calls::Calls; // upward\n",
    )
    .unwrap();
    std::fs::write(dir.join("http.rs"), "use crate::store::AsyncStore;\n").unwrap();
    std::fs::write(dir.join("lib.rs"), "pub mod sfu;\n").unwrap();
    let problems = violations(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(
        problems[0].contains("`http` reaches the store"),
        "{problems:#?}"
    );
    assert!(problems[1].contains("`sfu` (rank 0) imports `calls` (rank 4)"));
}
