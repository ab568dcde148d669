//! A newcomer's read, checked: the crates' sources keep the shape
//! ARCHITECTURE.md promises. No function outside tests is over 120 lines;
//! no two modules of a crate import each other, directly or around a
//! loop; the core does no I/O; and in the actors crate only the edges
//! (`nats.rs` beside an actor, `transport.rs`, `control.rs`) touch NATS.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::common::repo_root;

const CRATES: [&str; 5] = ["messages", "core", "models", "actors", "runtime"];

/// Every `.rs` file under `dir`, with its text up to its test module (the
/// tests below look at what ships, not at what tests it).
fn sources(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())).flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") && path.file_name().is_some_and(|f| f != "tests.rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                let shipped = text.split("#[cfg(test)]").next().unwrap_or_default().to_string();
                out.push((path, shipped));
            }
        }
    }
    out.sort();
    out
}

/// The functions of `text` longer than `most` lines: (name, first line,
/// length). A function runs from its `fn` line to the first line that
/// closes it at the same indentation.
fn long_functions(text: &str, most: usize) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut long = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let code = line.trim_start();
        let indent = &line[..line.len() - code.len()];
        let after_fn =
            ["pub fn ", "fn ", "pub async fn ", "async fn ", "pub(super) fn ", "pub(super) async fn ", "pub(crate) fn ", "pub(crate) async fn ", "pub const fn ", "const fn "]
                .iter()
                .find_map(|p| code.strip_prefix(p));
        let Some(rest) = after_fn else { continue };
        if code.ends_with(';') {
            continue;
        }
        let close = format!("{indent}}}");
        let Some(end) = lines[i..].iter().position(|l| *l == close) else { continue };
        if end + 1 > most {
            let name = rest.split(|c: char| !(c.is_alphanumeric() || c == '_')).next().unwrap_or_default();
            long.push((name.to_string(), i + 1, end + 1));
        }
    }
    long
}

#[test]
fn no_function_outside_tests_is_over_120_lines() {
    let mut long = Vec::new();
    for krate in CRATES {
        for (path, text) in sources(&repo_root().join(krate).join("src")) {
            for (name, line, n) in long_functions(&text, 120) {
                long.push(format!("{}:{line} {name}: {n} lines", path.strip_prefix(repo_root()).unwrap().display()));
            }
        }
    }
    assert!(long.is_empty(), "split these so that each reads as one thing:\n{}", long.join("\n"));
}

#[test]
fn the_length_check_finds_a_long_function() {
    let body = "    let x = 1;\n".repeat(130);
    let text = format!("pub fn short() {{\n}}\n\n    pub async fn long(a: u8) -> u8 {{\n{body}    }}\n");
    assert_eq!(long_functions(&text, 120), [("long".to_string(), 4, 132)]);
}

/// Which top-level modules of a crate each module names (`crate::x`).
fn module_imports(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (path, text) in sources(src) {
        let rel = path.strip_prefix(src).unwrap();
        let top = rel.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        for (i, _) in text.match_indices("crate::") {
            let name: String = text[i + 7..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !name.is_empty() && name != top {
                graph.entry(top.clone()).or_default().insert(name);
            }
        }
    }
    graph
}

/// A loop in `graph`, if there is one, as the modules around it.
fn import_loop(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(m: &str, graph: &BTreeMap<String, BTreeSet<String>>, path: &mut Vec<String>, done: &mut BTreeSet<String>) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == m) {
            let mut around = path[at..].to_vec();
            around.push(m.to_string());
            return Some(around);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for next in graph.get(m).into_iter().flatten() {
            if let Some(l) = visit(next, graph, path, done) {
                return Some(l);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|m| visit(m, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_modules_import_each_other() {
    for krate in CRATES {
        let graph = module_imports(&repo_root().join(krate).join("src"));
        assert!(!graph.is_empty() || krate == "messages" || krate == "models", "{krate}: no imports found, so this check would check nothing");
        if let Some(around) = import_loop(&graph) {
            panic!("{krate}: an import loop: {}", around.join(" -> "));
        }
    }
    let looped: BTreeMap<String, BTreeSet<String>> = [("a", "b"), ("b", "c"), ("c", "a")].into_iter().map(|(m, n)| (m.to_string(), BTreeSet::from([n.to_string()]))).collect();
    assert_eq!(import_loop(&looped), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]), "the check finds a loop");
}

#[test]
fn the_core_does_no_io_and_only_the_actors_edges_touch_nats() {
    let mut wrong = Vec::new();
    for (path, text) in sources(&repo_root().join("core/src")) {
        for io in ["async_nats", "tokio::", "actix", "std::net", "tch::"] {
            if text.contains(io) {
                wrong.push(format!("{}: {io} (the core does no I/O: the caller drives it)", path.display()));
            }
        }
    }
    let edges = ["nats.rs", "transport.rs", "control.rs"];
    let actors = sources(&repo_root().join("actors/src"));
    assert!(actors.iter().any(|(p, t)| p.ends_with("worker/nats.rs") && t.contains("async_nats")), "the check sees the workers' edge");
    for (path, text) in actors {
        let edge = path.file_name().is_some_and(|f| edges.iter().any(|e| f == *e));
        if !edge && text.contains("async_nats") {
            wrong.push(format!("{}: async_nats outside an edge ({})", path.display(), edges.join(", ")));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
