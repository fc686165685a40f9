//! The house rules of the relay's sources (docs/architecture.md, "Modules
//! of the relay"), checked by reading them: no import circle, at most three
//! public modules, a core that reaches no tokio and no quinn, and the size
//! limits in the relay and its core (no function over `MAX_FN_LINES`, no
//! file over `MAX_FILE_LINES`, counting non-blank lines and leaving test
//! modules out).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use syn::spanned::Spanned;
use syn::visit::Visit;

/// Longest function, in non-blank lines.
const MAX_FN_LINES: usize = 100;
/// Longest file, in non-blank lines outside test modules.
const MAX_FILE_LINES: usize = 800;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The sans-IO core's sources (crate `relay-core`).
fn core_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../core/src")
}

/// Every `.rs` file under `dir`, with its module: the first path part
/// under src (a directory is one module), the file stem for a file.
fn sources(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p.strip_prefix(dir).unwrap();
                let first = rel.components().next().unwrap().as_os_str();
                let module = Path::new(first)
                    .file_stem()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.push((module, p));
            }
        }
    }
    out.sort();
    out
}

/// The relay's modules and the modules each names (`crate::NAME`).
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let files: Vec<_> = sources(&src())
        .into_iter()
        .filter(|(m, _)| m != "lib" && m != "bin" && m != "house")
        .collect();
    let modules: BTreeSet<String> = files.iter().map(|(m, _)| m.clone()).collect();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, path) in files {
        let text = std::fs::read_to_string(path).unwrap();
        let uses = out.entry(m.clone()).or_default();
        for part in text.split("crate::").skip(1) {
            let name: String = part
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if name != m && modules.contains(&name) {
                uses.insert(name);
            }
        }
        // `use crate::{a, b}`
        for part in text.split("crate::{").skip(1) {
            let list = part.split('}').next().unwrap_or_default();
            for item in list.split(',') {
                let name = item.trim().split("::").next().unwrap_or_default().trim();
                if name != m && modules.contains(name) {
                    uses.insert(name.to_owned());
                }
            }
        }
    }
    out
}

/// A module met again while still on the path closes a circle.
fn circle(
    m: &str,
    g: &BTreeMap<String, BTreeSet<String>>,
    path: &mut Vec<String>,
    done: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    if let Some(i) = path.iter().position(|p| p == m) {
        let mut c = path[i..].to_vec();
        c.push(m.to_owned());
        return Some(c);
    }
    if done.contains(m) {
        return None;
    }
    path.push(m.to_owned());
    for next in g.get(m).into_iter().flatten() {
        if let Some(c) = circle(next, g, path, done) {
            return Some(c);
        }
    }
    path.pop();
    done.insert(m.to_owned());
    None
}

/// No module imports one that imports it back, however far round.
#[test]
fn no_module_imports_one_that_imports_it_back() {
    let graph = imports();
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        if let Some(c) = circle(m, &graph, &mut Vec::new(), &mut done) {
            panic!("import circle: {}", c.join(" -> "));
        }
    }
    // The reader sees what it should.
    assert!(graph["conn"].contains("state"), "{graph:?}");
    assert!(graph["cluster"].contains("push"), "{graph:?}");
}

fn parse(path: &Path) -> (String, syn::File) {
    let text = std::fs::read_to_string(path).unwrap();
    let file = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (text, file)
}

/// The library's public surface: at most three public modules, and at its
/// root only `Config`, `Relay` and `StartError`.
#[test]
fn the_library_shows_three_modules_and_three_types() {
    let (_, lib) = parse(&src().join("lib.rs"));
    let public = |v: &syn::Visibility| matches!(v, syn::Visibility::Public(_));
    let mut modules = Vec::new();
    let mut names = Vec::new();
    for item in &lib.items {
        match item {
            syn::Item::Mod(m) if public(&m.vis) => modules.push(m.ident.to_string()),
            syn::Item::Use(u) if public(&u.vis) => use_names(&u.tree, &mut names),
            syn::Item::Fn(f) if public(&f.vis) => names.push(f.sig.ident.to_string()),
            syn::Item::Struct(s) if public(&s.vis) => names.push(s.ident.to_string()),
            syn::Item::Enum(e) if public(&e.vis) => names.push(e.ident.to_string()),
            _ => {}
        }
    }
    assert!(modules.len() <= 3, "public modules: {modules:?}");
    names.sort();
    assert_eq!(names, ["Config", "Relay", "StartError"]);
}

/// The names a `use` brings in.
fn use_names(tree: &syn::UseTree, out: &mut Vec<String>) {
    match tree {
        syn::UseTree::Path(p) => use_names(&p.tree, out),
        syn::UseTree::Name(n) => out.push(n.ident.to_string()),
        syn::UseTree::Rename(r) => out.push(r.rename.to_string()),
        syn::UseTree::Glob(_) => out.push("*".into()),
        syn::UseTree::Group(g) => g.items.iter().for_each(|t| use_names(t, out)),
    }
}

/// Non-blank lines of `text` from line `first` to line `last` (1-based).
fn lines(text: &[&str], first: usize, last: usize) -> usize {
    text[first - 1..last]
        .iter()
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// `#[cfg(test)]`, `#[test]` or `#[tokio::test(...)]`.
fn is_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        let test_fn = a.path().segments.last().is_some_and(|s| s.ident == "test");
        let cfg_test =
            a.path().is_ident("cfg") && a.parse_args::<syn::Ident>().is_ok_and(|i| i == "test");
        test_fn || cfg_test
    })
}

/// Measures a file: its functions' sizes and the lines of its test items.
struct Sizes<'a> {
    text: &'a [&'a str],
    fns: Vec<(String, usize)>,
    test_lines: usize,
}

impl Sizes<'_> {
    fn span(&self, s: proc_macro2::Span) -> usize {
        lines(self.text, s.start().line, s.end().line)
    }
    fn function(&mut self, name: &syn::Ident, whole: proc_macro2::Span) {
        let n = self.span(whole);
        self.fns.push((name.to_string(), n));
    }
}

impl<'ast> Visit<'ast> for Sizes<'_> {
    fn visit_item(&mut self, i: &'ast syn::Item) {
        let attrs: &[syn::Attribute] = match i {
            syn::Item::Mod(m) => &m.attrs,
            syn::Item::Fn(f) => &f.attrs,
            syn::Item::Impl(m) => &m.attrs,
            _ => &[],
        };
        if is_test(attrs) {
            self.test_lines += self.span(i.span());
            return;
        }
        syn::visit::visit_item(self, i);
    }
    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        self.function(&f.sig.ident, f.span());
        syn::visit::visit_item_fn(self, f);
    }
    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        if is_test(&f.attrs) {
            return;
        }
        self.function(&f.sig.ident, f.span());
        syn::visit::visit_impl_item_fn(self, f);
    }
    fn visit_trait_item_fn(&mut self, f: &'ast syn::TraitItemFn) {
        if f.default.is_some() {
            self.function(&f.sig.ident, f.span());
        }
        syn::visit::visit_trait_item_fn(self, f);
    }
}

/// What is over a limit: ("path" or "path fn name", size).
fn over_limits(root: &Path) -> BTreeMap<String, usize> {
    let mut over = BTreeMap::new();
    for (_, path) in sources(root) {
        let (text, file) = parse(&path);
        let text: Vec<&str> = text.lines().collect();
        let mut sizes = Sizes {
            text: &text,
            fns: Vec::new(),
            test_lines: 0,
        };
        sizes.visit_file(&file);
        let rel = path.strip_prefix(root).unwrap().display().to_string();
        let file_lines = lines(&text, 1, text.len()) - sizes.test_lines;
        if file_lines > MAX_FILE_LINES {
            over.insert(rel.clone(), file_lines);
        }
        for (name, n) in sizes.fns {
            if n > MAX_FN_LINES {
                let key = format!("{rel} fn {name}");
                let was = over.get(&key).copied().unwrap_or(0);
                over.insert(key, n.max(was));
            }
        }
    }
    over
}

/// No function over 100 lines and no file over 800, in the relay and in
/// its core.
#[test]
fn no_function_over_100_lines_and_no_file_over_800() {
    let mut over = over_limits(&src());
    for (what, n) in over_limits(&core_src()) {
        over.insert(format!("core/{what}"), n);
    }
    let list: Vec<String> = over
        .iter()
        .map(|(w, n)| format!("{w}: {n} lines"))
        .collect();
    assert!(list.is_empty(), "over the limits:\n{}", list.join("\n"));
}

/// The core decides without I/O: nothing it depends on, however far
/// down (read from the workspace's lock file), is tokio or quinn, so the
/// compiler refuses a socket or a task in it.
#[test]
fn the_core_reaches_no_tokio_and_no_quinn() {
    let lock = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock");
    let lock: toml::Table = std::fs::read_to_string(lock).unwrap().parse().unwrap();
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in lock["package"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap().to_owned();
        let list = p.get("dependencies").and_then(|d| d.as_array());
        // "name" or "name version" when two versions are locked.
        let names = list.into_iter().flatten().filter_map(|d| d.as_str());
        let names = names.map(|d| d.split(' ').next().unwrap_or(d).to_owned());
        deps.entry(name).or_default().extend(names);
    }
    let mut seen = BTreeSet::new();
    let mut todo = vec!["relay-core".to_owned()];
    while let Some(p) = todo.pop() {
        if seen.insert(p.clone()) {
            todo.extend(deps.get(&p).into_iter().flatten().cloned());
        }
    }
    assert!(
        seen.contains("codec") && seen.contains("dashmap") && seen.contains("foldhash"),
        "{seen:?}"
    );
    for io in ["tokio", "quinn", "quinn-proto", "mio", "socket2"] {
        assert!(!seen.contains(io), "relay-core reaches {io}");
    }
}

/// The measure itself: a function's lines, a file's without its tests.
#[test]
fn the_measure_counts_non_blank_lines_and_leaves_tests_out() {
    let dir = tempfile::tempdir().unwrap();
    let long_body = "    let x = 1;\n\n".repeat(MAX_FN_LINES - 1);
    let text = format!(
        "fn short() {{\n    let y = 2;\n}}\n\nfn long() {{\n{long_body}}}\n\n\
         #[cfg(test)]\nmod tests {{\n    #[test]\n    fn t() {{\n{long_body}{long_body}    }}\n}}\n"
    );
    std::fs::write(dir.path().join("a.rs"), &text).unwrap();
    let over = over_limits(dir.path());
    // `long`: its signature, 99 lines of body and its brace.
    assert_eq!(
        over.get("a.rs fn long"),
        Some(&(MAX_FN_LINES + 1)),
        "{over:?}"
    );
    assert_eq!(over.len(), 1, "{over:?}");
}
