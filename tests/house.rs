//! Fences that keep the house tidy, checked on every `cargo test`:
//! - no import cycles between the files, nor between the top-level
//!   modules, of `src/` and `mock-upstreams/src/` (read from `crate::`
//!   paths outside `#[cfg(test)]` code): rooms import downwards;
//! - no `.rs` file over [`MAX_FILE_LINES`] lines in the workspace's
//!   sources, tests, benches and load tests (`too_many_lines` in clippy
//!   keeps functions short the same way).
#![expect(clippy::unwrap_used, reason = "a fence stops loudly")]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The longest a source file may grow; split by concept before it.
const MAX_FILE_LINES: usize = 700;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir`, relative to it.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(at) = pending.pop() {
        for entry in std::fs::read_dir(&at).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                found.push(path.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    found.sort();
    found
}

/// A crate's sources: file (relative to its `src/`) -> code before its
/// first `#[cfg(test)]`, comments dropped.
fn sources(src: &Path) -> BTreeMap<String, String> {
    rust_files(src)
        .into_iter()
        .map(|rel| {
            let text = std::fs::read_to_string(src.join(&rel)).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap_or("");
            let code: Vec<&str> = code
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect();
            (rel.to_string_lossy().into_owned(), code.join("\n"))
        })
        .collect()
}

/// The file a `crate::a::b::c` path lands in: the longest prefix that is
/// a file (`a/b.rs` or `a/b/mod.rs`).
fn file_of(files: &BTreeMap<String, String>, segments: &[&str]) -> Option<String> {
    (1..=segments.len()).rev().find_map(|n| {
        let joined = segments[..n].join("/");
        [format!("{joined}.rs"), format!("{joined}/mod.rs")]
            .into_iter()
            .find(|candidate| files.contains_key(candidate))
    })
}

/// The `crate::` paths a file's code names, grouped imports spread out
/// (`use crate::{a::X, b::{Y, Z}}` names `a::X`, `b`).
fn crate_paths(code: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let after = &rest[at + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            let end = group
                .find("};")
                .or_else(|| group.find('}'))
                .unwrap_or(group.len());
            for item in group[..end].split(',') {
                let segments: Vec<String> = item
                    .trim()
                    .trim_start_matches('{')
                    .split("::")
                    .map(str::trim)
                    .take_while(|s| s.starts_with(|c: char| c.is_ascii_lowercase()))
                    .map(str::to_owned)
                    .collect();
                if !segments.is_empty() {
                    paths.push(segments);
                }
            }
        } else {
            let segments: Vec<String> = after
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .next()
                .unwrap_or("")
                .split("::")
                .take_while(|s| s.starts_with(|c: char| c.is_ascii_lowercase()))
                .map(str::to_owned)
                .collect();
            if !segments.is_empty() {
                paths.push(segments);
            }
        }
        rest = after;
    }
    paths
}

/// The top-level module a file belongs to (`None` for the crate root).
fn module_of(file: &str) -> Option<&str> {
    let first = file.split('/').next()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then_some(name)
}

/// Strongly connected components of more than one node (Tarjan's).
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct Walk<'e> {
        edges: &'e BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'e str, usize>,
        low: BTreeMap<&'e str, usize>,
        stack: Vec<&'e str>,
        found: Vec<Vec<String>>,
    }
    impl<'e> Walk<'e> {
        fn visit(&mut self, node: &'e str) {
            let n = self.index.len();
            self.index.insert(node, n);
            self.low.insert(node, n);
            self.stack.push(node);
            for next in self.edges.get(node).into_iter().flatten() {
                if !self.index.contains_key(next.as_str()) {
                    self.visit(next);
                    let low = self.low[node].min(self.low[next.as_str()]);
                    self.low.insert(node, low);
                } else if self.stack.contains(&next.as_str()) {
                    let low = self.low[node].min(self.index[next.as_str()]);
                    self.low.insert(node, low);
                }
            }
            if self.low[node] == self.index[node] {
                let mut component = Vec::new();
                while let Some(top) = self.stack.pop() {
                    component.push(top.to_owned());
                    if top == node {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.found.push(component);
                }
            }
        }
    }
    let mut walk = Walk {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        found: Vec::new(),
    };
    for node in edges.keys() {
        if !walk.index.contains_key(node.as_str()) {
            walk.visit(node);
        }
    }
    walk.found
}

/// (file cycles, module cycles) of the crate whose sources are in `src`.
fn import_cycles(src: &Path) -> (Vec<Vec<String>>, Vec<Vec<String>>) {
    let files = sources(src);
    let mut file_edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut module_edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (file, code) in &files {
        for path in crate_paths(code) {
            let segments: Vec<&str> = path.iter().map(String::as_str).collect();
            let Some(target) = file_of(&files, &segments) else {
                continue;
            };
            if target != *file {
                file_edges
                    .entry(file.clone())
                    .or_default()
                    .insert(target.clone());
            }
            if let (Some(from), Some(to)) = (module_of(file), module_of(&target))
                && from != to
            {
                module_edges
                    .entry(from.to_owned())
                    .or_default()
                    .insert(to.to_owned());
            }
        }
    }
    (cycles(&file_edges), cycles(&module_edges))
}

#[test]
fn no_file_or_module_imports_back_into_itself() {
    for src in ["src", "mock-upstreams/src"] {
        let (files, modules) = import_cycles(&root().join(src));
        assert!(
            files.is_empty() && modules.is_empty(),
            "{src}: file cycles {files:?}, module cycles {modules:?}"
        );
    }
}

/// The check sees a cycle when there is one: two files that name each
/// other, and a third that closes a loop through a grouped import.
#[test]
fn the_cycle_check_finds_a_cycle() {
    let dir = std::env::temp_dir().join(format!("house-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("b")).unwrap();
    std::fs::write(dir.join("lib.rs"), "mod a;\nmod b;\n").unwrap();
    std::fs::write(dir.join("a.rs"), "use crate::b::inner::Thing;\n").unwrap();
    std::fs::write(dir.join("b/mod.rs"), "pub mod inner;\n").unwrap();
    std::fs::write(
        dir.join("b/inner.rs"),
        "use crate::{a, b};\n// use crate::c;\n#[cfg(test)]\nuse crate::d;\n",
    )
    .unwrap();
    let (files, modules) = import_cycles(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(
        files,
        vec![vec!["a.rs".to_owned(), "b/inner.rs".to_owned()]]
    );
    assert_eq!(modules, vec![vec!["a".to_owned(), "b".to_owned()]]);
}

#[test]
fn no_source_file_passes_the_line_limit() {
    let mut long = Vec::new();
    for dir in [
        "src",
        "tests",
        "benches",
        "loadtest/src",
        "mock-upstreams/src",
    ] {
        let dir = root().join(dir);
        for rel in rust_files(&dir) {
            let lines = std::fs::read_to_string(dir.join(&rel))
                .unwrap()
                .lines()
                .count();
            if lines > MAX_FILE_LINES {
                long.push(format!("{}: {lines}", dir.join(&rel).display()));
            }
        }
    }
    assert!(
        long.is_empty(),
        "files over {MAX_FILE_LINES} lines (split by concept): {long:?}"
    );
}

/// Repeated code: runs of at least [`WINDOW`] lines (trimmed; blank lines
/// and lone brackets left out) that appear elsewhere in `src/` or
/// `tests/` too, counted once per run and file. The ceiling is the count
/// when it was set: a change may lower it (and should lower the
/// constant), never raise it.
const WINDOW: usize = 6;
const DUPLICATE_RUNS_CEILING: usize = 22;

/// The runs of repeated lines in the files under `dirs`.
fn duplicate_runs(dirs: &[PathBuf]) -> Vec<String> {
    use std::collections::HashMap;
    let mut files: Vec<(String, Vec<String>)> = Vec::new();
    for dir in dirs {
        for rel in rust_files(dir) {
            let text = std::fs::read_to_string(dir.join(&rel)).unwrap();
            let lines = text
                .lines()
                .map(str::trim)
                .filter(|l| l.len() > 3 && !l.starts_with("//"))
                .map(str::to_owned)
                .collect();
            files.push((dir.join(&rel).display().to_string(), lines));
        }
    }
    let mut seen: HashMap<&[String], usize> = HashMap::new();
    for (_, lines) in &files {
        for window in lines.windows(WINDOW) {
            *seen.entry(window).or_default() += 1;
        }
    }
    let mut runs = Vec::new();
    for (name, lines) in &files {
        let mut in_run = false;
        for window in lines.windows(WINDOW) {
            let repeated = seen[window] > 1;
            if repeated && !in_run {
                runs.push(format!("{name}: {}", window[0]));
            }
            in_run = repeated;
        }
    }
    runs
}

#[test]
fn repeated_code_stays_under_its_ceiling() {
    let runs = duplicate_runs(&[root().join("src"), root().join("tests")]);
    assert!(
        runs.len() <= DUPLICATE_RUNS_CEILING,
        "{} runs of {WINDOW}+ repeated lines (ceiling {DUPLICATE_RUNS_CEILING}); the newest are among:\n{}",
        runs.len(),
        runs.join("\n")
    );
    println!("{} runs of repeated lines", runs.len());
}

/// The count sees repetition: seven shared lines in two files are two
/// runs (one in each), short lines and comments do not count.
#[test]
fn the_repetition_count_finds_a_copy() {
    let dir = std::env::temp_dir().join(format!("house-dup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let shared: String = (0..7)
        .map(|i| format!("let value_{i} = compute({i});\n"))
        .collect();
    std::fs::write(dir.join("a.rs"), format!("fn a() {{\n{shared}}}\n")).unwrap();
    std::fs::write(
        dir.join("b.rs"),
        format!("// copy\nfn b() {{\n{shared}}}\n"),
    )
    .unwrap();
    std::fs::write(dir.join("c.rs"), "}\n}\n}\n}\n}\n}\n}\n// x\n// x\n").unwrap();
    let runs = duplicate_runs(std::slice::from_ref(&dir));
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(runs.len(), 2, "{runs:?}");
}
