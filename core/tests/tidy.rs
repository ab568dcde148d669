//! Tidy: the invariants of ARCHITECTURE.md that a program can check, on the
//! workspace's sources (in the libtorch-free crate, so it runs anywhere in
//! seconds).
//! - No libtorch, actors or NATS in `messages/` and `core/`.
//! - No printing in library crates: they log with `tracing`.
//! - No file imports a file that imports it back, directly or around a
//!   longer circle (modules of one crate; tests excluded).
//! - Every file is rustfmt-clean.
//! - No function outside tests is over 120 lines.
//! - In `actors/`, only the NATS edges (`nats.rs` beside an actor,
//!   `transport.rs`, `control.rs`) touch NATS.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("core/ sits in the workspace").to_path_buf()
}

const CRATES: [&str; 5] = ["messages", "core", "models", "actors", "runtime"];

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// A file's code without its unit tests (they sit at the end, after
/// `#[cfg(test)]`) and without comments.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let text = match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => &text[..],
    };
    text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// The `[dependencies]` table of a crate's manifest, as names.
fn dependencies(krate: &str) -> Vec<String> {
    let manifest = std::fs::read_to_string(workspace().join(krate).join("Cargo.toml")).unwrap();
    let table: toml::Table = manifest.parse().unwrap();
    table.get("dependencies").and_then(|d| d.as_table()).map(|d| d.keys().cloned().collect()).unwrap_or_default()
}

#[test]
fn the_wire_types_and_the_pure_core_need_no_libtorch_actors_or_nats() {
    let forbidden_crates = ["tch", "torch-sys", "actix", "actix-rt", "actix-web", "async-nats", "tokio", "branchpoint-models", "branchpoint-actors"];
    let forbidden_paths = ["tch::", "torch_sys", "actix", "async_nats", "tokio::"];
    let mut found = Vec::new();
    for krate in ["messages", "core"] {
        for dep in dependencies(krate) {
            if forbidden_crates.contains(&dep.as_str()) {
                found.push(format!("{krate}/Cargo.toml depends on {dep}"));
            }
        }
        for file in rust_files(&workspace().join(krate).join("src")) {
            let text = code(&file);
            for p in forbidden_paths {
                if text.contains(p) {
                    found.push(format!("{} uses {p}", file.display()));
                }
            }
        }
    }
    assert!(found.is_empty(), "the pure crates must stay pure:\n{}", found.join("\n"));
}

#[test]
fn library_crates_do_not_print() {
    let mut found = Vec::new();
    for krate in ["messages", "core", "models", "actors"] {
        for file in rust_files(&workspace().join(krate).join("src")) {
            for (i, line) in code(&file).lines().enumerate() {
                for m in ["println!(", "print!(", "dbg!("] {
                    // `print!(` also finds `eprint!(` and `eprintln!(`'s tail.
                    if line.contains(m) {
                        found.push(format!("{}:{}: {}", file.display(), i + 1, line.trim()));
                        break;
                    }
                }
            }
        }
    }
    assert!(found.is_empty(), "library crates log with tracing (levels and fields), never print:\n{}", found.join("\n"));
}

/// A crate's modules: module path ("" for the root) -> file.
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    rust_files(src)
        .into_iter()
        .map(|f| {
            let rel = f.strip_prefix(src).unwrap().with_extension("");
            let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
            if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
                parts.pop();
            }
            (parts.join("::"), f)
        })
        .collect()
}

fn join(base: &str, name: &str) -> String {
    if base.is_empty() {
        name.to_string()
    } else {
        format!("{base}::{name}")
    }
}

fn parent(module: &str) -> String {
    module.rsplit_once("::").map_or(String::new(), |(p, _)| p.to_string())
}

/// The identifier paths after `prefix` (`crate::`, `super::`, ...) in
/// `code`, with one level of `{a, b::c}` groups expanded.
fn paths_after(code: &str, prefix: &str) -> Vec<Vec<String>> {
    let ident = |s: &str| -> Vec<String> {
        let mut out = Vec::new();
        for seg in s.split("::") {
            let seg: String = seg.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if seg.is_empty() {
                break;
            }
            out.push(seg);
        }
        out
    };
    let mut out = Vec::new();
    for (i, _) in code.match_indices(prefix) {
        let before = code[..i].chars().last();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let rest = &code[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            out.extend(group.split(',').map(|g| ident(g.trim())).filter(|p| !p.is_empty()));
        } else {
            out.push(ident(rest));
        }
    }
    out
}

/// Which modules each module imports: `crate::`, `super::` and `self::`
/// paths, and paths through its own child modules.
fn imports(mods: &BTreeMap<String, PathBuf>) -> BTreeMap<String, BTreeSet<String>> {
    let resolve = |base: String, path: &[String]| -> Option<String> {
        (1..=path.len()).rev().map(|k| path[..k].iter().fold(base.clone(), |m, s| join(&m, s))).find(|m| mods.contains_key(m))
    };
    let mut edges = BTreeMap::new();
    for (m, file) in mods {
        let code = code(file);
        // A module's path already says where it sits (`a/mod.rs` is `a`,
        // `a/b.rs` is `a::b`): `self` is the module, `super` its parent.
        let here = m.clone();
        let up = parent(m);
        let mut deps = BTreeSet::new();
        for p in paths_after(&code, "crate::") {
            deps.extend(resolve(String::new(), &p));
        }
        for p in paths_after(&code, "super::") {
            deps.extend(resolve(up.clone(), &p).or_else(|| (!up.is_empty() || p.is_empty()).then(|| up.clone())));
        }
        for p in paths_after(&code, "self::") {
            deps.extend(resolve(here.clone(), &p));
        }
        // Paths through a child module, as a parent writes them.
        for child in mods.keys().filter(|c| parent(c) == *m && !c.is_empty()) {
            let name = child.rsplit("::").next().unwrap();
            for p in paths_after(&code, &format!("{name}::")) {
                let mut full = vec![name.to_string()];
                full.extend(p);
                deps.extend(resolve(here.clone(), &full));
            }
        }
        deps.remove(m);
        deps.remove(""); // lib.rs declares the modules; importing it is importing them
        edges.insert(m.clone(), deps);
    }
    edges
}

/// Circles among `edges`: each strongly connected component of more than one
/// module (Tarjan's algorithm).
fn circles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.edges.get(v).into_iter().flatten() {
            if !s.index.contains_key(w.as_str()) {
                visit(s, w);
                let lw = s.low[w.as_str()];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w.as_str()) {
                let iw = s.index[w.as_str()];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.found.push(component);
            }
        }
    }
    let mut s = State { edges, index: BTreeMap::new(), low: BTreeMap::new(), stack: Vec::new(), on_stack: BTreeSet::new(), found: Vec::new() };
    for v in edges.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.found
}

#[test]
fn no_file_imports_a_file_that_imports_it_back() {
    let mut found = Vec::new();
    for krate in CRATES {
        let mods = modules(&workspace().join(krate).join("src"));
        for c in circles(&imports(&mods)) {
            found.push(format!("{krate}: {}", c.join(" <-> ")));
        }
    }
    assert!(found.is_empty(), "modules that import each other (move what both need into a module of its own):\n{}", found.join("\n"));
}

#[test]
fn the_cycle_finder_finds_circles() {
    let edges: BTreeMap<String, BTreeSet<String>> =
        [("a", vec!["b"]), ("b", vec!["c"]), ("c", vec!["a"]), ("d", vec!["a"])].into_iter().map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect())).collect();
    assert_eq!(circles(&edges), vec![vec!["a".to_string(), "b".into(), "c".into()]]);
    let code = "use crate::{device::Device, plans};\nuse super::sim::Bin;\nfn f() { crate::planner::choose() }";
    assert_eq!(paths_after(code, "crate::"), vec![vec!["device".to_string(), "Device".into()], vec!["plans".into()], vec!["planner".into(), "choose".into()]]);
}

/// Needs rustfmt, which comes with the toolchain's default profile; on a
/// toolchain without it the check says so and checks nothing, as `.ci/run`
/// does.
#[test]
fn every_file_is_rustfmt_clean() {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    if !std::process::Command::new(&cargo).args(["fmt", "--version"]).output().is_ok_and(|o| o.status.success()) {
        eprintln!("tidy: rustfmt is not installed with this toolchain; formatting not checked (rustup component add rustfmt)");
        return;
    }
    let out = std::process::Command::new(&cargo).args(["fmt", "--all", "--check"]).current_dir(workspace()).output().expect("cargo fmt runs (rustup component add rustfmt)");
    assert!(out.status.success(), "run `cargo fmt --all`:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

/// Every package's features as `cargo tree` resolves them, with or without
/// the dev-dependencies (`--offline`: the lock file says everything).
fn resolved_features(edges: &str) -> BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = std::process::Command::new(&cargo)
        .args(["tree", "--offline", "--workspace", "--prefix", "none", "-e", edges, "-f", "{p}|{f}"])
        .current_dir(workspace())
        .output()
        .expect("cargo tree runs");
    assert!(out.status.success(), "cargo tree -e {edges}: {}", String::from_utf8_lossy(&out.stderr));
    let mut features: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let line = line.trim_end_matches(" (*)");
        if let Some((package, f)) = line.split_once('|') {
            features.entry(package.to_string()).or_default().insert(f.to_string());
        }
    }
    features
}

/// `make test` builds the tests right after `make setup` built the release
/// binaries. A dev-dependency that turns on more features of a package the
/// binaries use makes cargo build that package and everything above it
/// again for the tests, the whole binary crate included (80 s here, once
/// through rustix's "fs" from tempfile). The fix is to give the normal
/// dependency the same features (see runtime/Cargo.toml's rustix).
#[test]
fn the_tests_reuse_the_release_build() {
    let normal = resolved_features("normal,build");
    let with_dev = resolved_features("normal,build,dev");
    let differ: Vec<String> = normal
        .iter()
        .filter_map(|(package, f)| with_dev.get(package).filter(|g| *g != f).map(|g| format!("{package}: [{}] in the build, [{}] with the tests", join_all(f), join_all(g))))
        .collect();
    assert!(differ.is_empty(), "features that the dev-dependencies change, so `make test` rebuilds what depends on them:\n{}", differ.join("\n"));
}

fn join_all(set: &BTreeSet<String>) -> String {
    set.iter().cloned().collect::<Vec<_>>().join(" / ")
}

/// The functions of `code` longer than `most` lines: (name, first line,
/// length). A function runs from its `fn` line to the first line that
/// closes it at the same indentation (rustfmt's layout).
fn long_functions(code: &str, most: usize) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = code.lines().collect();
    let mut long = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let text = line.trim_start();
        let indent = &line[..line.len() - text.len()];
        let words: Vec<&str> = text.split_whitespace().collect();
        let Some(at) = words.iter().position(|w| *w == "fn") else { continue };
        let modifiers = ["pub", "pub(crate)", "pub(super)", "async", "const", "unsafe"];
        if !words[..at].iter().all(|w| modifiers.contains(w)) || text.ends_with(';') {
            continue;
        }
        let close = format!("{indent}}}");
        let Some(end) = lines[i..].iter().position(|l| *l == close) else { continue };
        if end + 1 > most {
            let name = words.get(at + 1).map_or("", |n| n.split(|c: char| !(c.is_alphanumeric() || c == '_')).next().unwrap_or(""));
            long.push((name.to_string(), i + 1, end + 1));
        }
    }
    long
}

#[test]
fn no_function_outside_tests_is_over_120_lines() {
    let mut long = Vec::new();
    for krate in CRATES {
        for path in rust_files(&workspace().join(krate).join("src")) {
            if path.file_name().is_some_and(|f| f == "tests.rs") {
                continue;
            }
            for (name, line, n) in long_functions(&code(&path), 120) {
                long.push(format!("{}:{line} {name}: {n} lines", path.strip_prefix(workspace()).unwrap().display()));
            }
        }
    }
    assert!(long.is_empty(), "split these so that each reads as one thing:\n{}", long.join("\n"));
}

#[test]
fn the_length_check_finds_a_long_function() {
    let body = "    let x = 1;\n".repeat(130);
    let code = format!("pub fn short() {{\n}}\n\n    pub(super) async fn long(a: u8) -> u8 {{\n{body}    }}\n");
    assert_eq!(long_functions(&code, 120), [("long".to_string(), 4, 132)]);
}

#[test]
fn only_the_actors_nats_edges_touch_nats() {
    let edges = ["nats.rs", "transport.rs", "control.rs"];
    let files = rust_files(&workspace().join("actors/src"));
    let touches = |p: &PathBuf| code(p).contains("async_nats");
    assert!(files.iter().any(|p| p.ends_with("worker/nats.rs") && touches(p)), "the check sees the workers' edge");
    let wrong: Vec<String> = files
        .iter()
        .filter(|p| !p.file_name().is_some_and(|f| edges.iter().any(|e| f == *e)) && touches(p))
        .map(|p| p.strip_prefix(workspace()).unwrap().display().to_string())
        .collect();
    assert!(wrong.is_empty(), "async_nats outside an edge ({}): {wrong:?}", edges.join(", "));
}
