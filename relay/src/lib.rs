//! The push-to-talk relay: accepts Opus clips over QUIC, relays them live
//! to online recipients as they arrive, stores them for the others, and
//! delivers the stored ones on reconnect. `docs/architecture.md` follows a
//! clip through these modules.

pub mod admin;
pub mod cluster;
pub mod config;
pub mod credit;
pub mod cursors;
pub mod disk_store;
pub mod error;
pub mod expired;
pub mod faults;
pub mod json_file;
pub mod limits;
pub mod live;
pub mod metrics;
pub mod push;
pub mod refusal;
pub mod router;
pub mod segment_log;
pub mod server;
pub mod session;
pub mod signal;
pub mod state;
pub mod store;
pub mod tls;
pub mod usage;
pub mod web;
pub mod webtransport;

pub use config::{Config, Settings, StoreKind};
pub use server::Relay;

/// Wall-clock time, Unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    /// The relay's modules (a directory is one module) and the modules each
    /// names (`crate::NAME`), read from the sources.
    fn imports() -> BTreeMap<String, BTreeSet<String>> {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files: Vec<(String, std::path::PathBuf)> = Vec::new();
        for e in std::fs::read_dir(&src).unwrap().flatten() {
            let p = e.path();
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            if p.is_dir() && name != "bin" {
                for f in std::fs::read_dir(&p).unwrap().flatten() {
                    files.push((name.clone(), f.path()));
                }
            } else if p.extension().is_some_and(|x| x == "rs") && name != "lib" {
                files.push((name, p));
            }
        }
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

    /// No module imports one that imports it back, however far round
    /// (docs/architecture.md, "Modules of the relay").
    #[test]
    fn no_module_imports_one_that_imports_it_back() {
        let graph = imports();
        // Depth-first: a module met again while still on the path closes a
        // circle.
        fn visit(
            m: &str,
            g: &BTreeMap<String, BTreeSet<String>>,
            path: &mut Vec<String>,
            done: &mut BTreeSet<String>,
        ) -> Option<Vec<String>> {
            if let Some(i) = path.iter().position(|p| p == m) {
                let mut circle = path[i..].to_vec();
                circle.push(m.to_owned());
                return Some(circle);
            }
            if done.contains(m) {
                return None;
            }
            path.push(m.to_owned());
            for next in g.get(m).into_iter().flatten() {
                if let Some(c) = visit(next, g, path, done) {
                    return Some(c);
                }
            }
            path.pop();
            done.insert(m.to_owned());
            None
        }
        let mut done = BTreeSet::new();
        for m in graph.keys() {
            if let Some(circle) = visit(m, &graph, &mut Vec::new(), &mut done) {
                panic!("import circle: {}", circle.join(" -> "));
            }
        }
        // The reader sees what it should.
        assert!(graph["session"].contains("state"), "{graph:?}");
        assert!(graph["cluster"].contains("push"), "{graph:?}");
    }
}
