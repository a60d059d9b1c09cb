//! The architecture, checked (in the spirit of rust-analyzer's tidy tests): every file under
//! `src/` may use only modules of its own layer or below, and the top-level modules form no
//! import circle. A new top-level module must be given a layer here, which is the moment to
//! decide where it belongs.
//!
//! The check reads `crate::` paths as text (in `use` lines, including `use crate::{a, b::c}`
//! groups, and in expressions), after dropping comments and the trailing `#[cfg(test)] mod
//! tests` block of a file: a unit test may reach up for fixtures, shipped code may not.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Layers, bottom first. A module may use modules of its own layer and below.
const LAYERS: &[(&str, u8)] = &[
    ("domain", 0),
    ("error", 0),
    ("codec", 0),
    ("secret", 0),
    ("pb", 0),
    ("crypto", 1),
    ("config", 2),
    ("metrics", 3),
    ("vault", 4),
    ("store", 4),
    ("tls", 4),
    ("audit", 4),
    ("keys", 5),
    ("access", 6),
    ("ops", 7),
    ("service", 8),
    ("app", 9),
    ("cli", 10),
    ("setup", 10),
];

/// Protobuf types are seen only at the edges.
const PB_USERS: &[&str] = &["service", "app", "cli", "setup", "pb"];

fn layer(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

/// Top-level module of a file under `src/` (`src/access/policy.rs` -> `access`).
fn module_of(rel: &Path) -> Option<String> {
    let first = rel.components().next()?.as_os_str().to_str()?;
    match first {
        "lib.rs" | "main.rs" | "bin" => None,
        f => Some(f.strip_suffix(".rs").unwrap_or(f).to_string()),
    }
}

/// The source a check reads: no comments, no trailing unit-test module.
fn shipped_code(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if t.starts_with("#[cfg(test)]")
            && lines
                .peek()
                .is_some_and(|next| next.trim_start().starts_with("mod tests"))
        {
            break;
        }
        if t.starts_with("//") {
            continue;
        }
        let code = match line.find("//") {
            // A `//` inside a string literal (a URL) is kept: good enough for paths.
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        };
        out.push_str(code);
        out.push('\n');
    }
    out
}

/// The top-level modules a piece of code names through `crate::`.
fn crate_refs(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = code.as_bytes();
    let mut i = 0;
    while let Some(at) = code[i..].find("crate::") {
        let start = i + at;
        // `piiguard::crate::`-like tails and identifiers ending in `crate` are not paths.
        let preceded_by_ident =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut j = start + "crate::".len();
        if !preceded_by_ident {
            collect_tree(code, &mut j, &mut out);
        }
        i = j.max(start + 1);
    }
    out
}

/// Reads the path tree after `crate::` at `*j`: `name...` or `{a::b, c, d::{e}}`, and records
/// the first segment of each branch.
fn collect_tree(code: &str, j: &mut usize, out: &mut BTreeSet<String>) {
    let bytes = code.as_bytes();
    skip_ws(bytes, j);
    if *j < bytes.len() && bytes[*j] == b'{' {
        // A group: record the first segment of every top-level item.
        *j += 1;
        let mut depth = 0usize;
        let mut at_item_start = true;
        while *j < bytes.len() {
            let b = bytes[*j];
            match b {
                b'{' => depth += 1,
                b'}' if depth == 0 => {
                    *j += 1;
                    return;
                }
                b'}' => depth -= 1,
                b',' if depth == 0 => at_item_start = true,
                _ if at_item_start && (b.is_ascii_alphabetic() || b == b'_') => {
                    let name = ident(bytes, *j);
                    *j += name.len();
                    if name != "self" {
                        out.insert(name);
                    }
                    at_item_start = false;
                    continue;
                }
                _ => {}
            }
            *j += 1;
        }
    } else {
        let name = ident(bytes, *j);
        *j += name.len();
        if !name.is_empty() {
            out.insert(name);
        }
    }
}

fn skip_ws(bytes: &[u8], j: &mut usize) {
    while *j < bytes.len() && bytes[*j].is_ascii_whitespace() {
        *j += 1;
    }
}

fn ident(bytes: &[u8], from: usize) -> String {
    let mut k = from;
    while k < bytes.len() && (bytes[k].is_ascii_alphanumeric() || bytes[k] == b'_') {
        k += 1;
    }
    String::from_utf8_lossy(&bytes[from..k]).into_owned()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// Problems found in a tree of sources: `(path relative to src/, text)`.
fn check(files: &[(PathBuf, String)]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rel, text) in files {
        let Some(module) = module_of(rel) else {
            continue;
        };
        let Some(own) = layer(&module) else {
            problems.push(format!(
                "{}: top-level module `{module}` has no layer (add it to LAYERS in tests/it/architecture.rs)",
                rel.display()
            ));
            continue;
        };
        for used in crate_refs(&shipped_code(text)) {
            if used == module {
                continue;
            }
            let Some(theirs) = layer(&used) else {
                problems.push(format!(
                    "{}: uses `crate::{used}`, which has no layer",
                    rel.display()
                ));
                continue;
            };
            if theirs > own {
                problems.push(format!(
                    "{}: `{module}` (layer {own}) uses `crate::{used}` (layer {theirs}), a higher layer",
                    rel.display()
                ));
            }
            if used == "pb" && !PB_USERS.contains(&module.as_str()) {
                problems.push(format!(
                    "{}: `{module}` uses protobuf types; only {PB_USERS:?} may",
                    rel.display()
                ));
            }
            graph.entry(module.clone()).or_default().insert(used);
        }
    }
    if let Some(circle) = find_circle(&graph) {
        problems.push(format!("import circle: {}", circle.join(" -> ")));
    }
    problems
}

/// A circle in the module graph, if there is one (depth-first search).
fn find_circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in graph.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let from = stack.iter().position(|s| s == m).unwrap_or(0);
                    let mut c = stack[from..].to_vec();
                    c.push(m.clone());
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(m, graph, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0
            && let Some(c) = visit(n, graph, &mut state, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

/// The tree checked: `src/`, or another one named by `PIIGUARD_ARCH_SRC` (to show the check on
/// an older checkout: `git archive <rev> src | tar -x -C /tmp/old`).
fn source_root() -> PathBuf {
    std::env::var_os("PIIGUARD_ARCH_SRC")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
}

#[test]
fn layers_hold_and_no_import_circle() {
    let src = source_root();
    let mut paths = Vec::new();
    rust_files(&src, &mut paths);
    let files: Vec<(PathBuf, String)> = paths
        .iter()
        .map(|p| {
            let rel = p.strip_prefix(&src).unwrap().to_path_buf();
            (rel, std::fs::read_to_string(p).unwrap())
        })
        .collect();
    assert!(files.len() > 30, "read only {} files", files.len());
    let problems = check(&files);
    assert!(
        problems.is_empty(),
        "architecture broken:\n{}",
        problems.join("\n")
    );
}

#[test]
fn every_folder_says_what_lives_there() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut missing = Vec::new();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() && p.file_name().is_some_and(|n| n != "bin") {
            let m = p.join("mod.rs");
            let text = std::fs::read_to_string(&m).unwrap_or_default();
            if !text.starts_with("//!") {
                missing.push(m.display().to_string());
            }
        }
    }
    assert!(missing.is_empty(), "no module doc: {missing:?}");
}

#[test]
fn main_rs_only_parses_and_hands_over() {
    let main = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/main.rs");
    let lines = std::fs::read_to_string(main).unwrap().lines().count();
    assert!(lines <= 150, "src/main.rs has {lines} lines");
}

// The checker itself must be able to fail: the shapes of the tree before the layout.

fn tree(files: &[(&str, &str)]) -> Vec<(PathBuf, String)> {
    files
        .iter()
        .map(|(p, t)| (PathBuf::from(p), (*t).to_string()))
        .collect()
}

#[test]
fn checker_finds_a_lower_layer_using_a_higher_one() {
    // config.rs imported authz/limits/ops, which all imported config.
    let p = check(&tree(&[
        ("config/mod.rs", "use crate::ops::MAX_SUBJECT_LEN;\n"),
        ("ops/mod.rs", "use crate::config::Config;\n"),
    ]));
    assert!(
        p.iter()
            .any(|p| p.contains("`config` (layer 2) uses `crate::ops`")),
        "{p:?}"
    );
    assert!(p.iter().any(|p| p.starts_with("import circle: ")), "{p:?}");
}

#[test]
fn checker_finds_a_circle_within_one_layer() {
    // audit/writer.rs imported alarms::Webhook while alarms imported audit: same shape.
    let p = check(&tree(&[
        ("vault/mod.rs", "fn f() { crate::store::open(); }\n"),
        (
            "store/mod.rs",
            "use crate::{error::Error, vault::{Vault, kv}};\n",
        ),
    ]));
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].starts_with("import circle: "), "{p:?}");
}

#[test]
fn checker_knows_every_module_and_pb_users() {
    let p = check(&tree(&[
        ("authz.rs", "use crate::error::Error;\n"),
        ("ops/mod.rs", "use crate::pb::EncryptRequest;\n"),
    ]));
    assert!(
        p.iter().any(|p| p.contains("`authz` has no layer")),
        "{p:?}"
    );
    assert!(
        p.iter().any(|p| p.contains("`ops` uses protobuf types")),
        "{p:?}"
    );
}

#[test]
fn checker_ignores_comments_and_unit_tests() {
    let p = check(&tree(&[(
        "crypto/mod.rs",
        "//! see crate::app\nfn f() {} // crate::app::run\n#[cfg(test)]\nmod tests {\n    use crate::app::run;\n}\n",
    )]));
    assert!(p.is_empty(), "{p:?}");
}

/// The bridge between `secret::Dek` and `secret::WrappedDek` (see `src/secret.rs`): the two
/// halves it offers are named in shipped code only by `src/secret.rs` and `src/vault/mod.rs`
/// (`Vault::wrap_dek` and `Vault::unwrap_dek`).
const BRIDGE: &[&str] = &["to_transit_plaintext", "from_transit_plaintext"];
const BRIDGE_FILES: &[&str] = &["secret.rs", "vault/mod.rs"];

fn bridge_users(files: &[(PathBuf, String)]) -> Vec<String> {
    let mut out = Vec::new();
    for (rel, text) in files {
        let code = shipped_code(text);
        for name in BRIDGE {
            if code.contains(name) && !BRIDGE_FILES.iter().any(|f| rel == Path::new(f)) {
                out.push(format!("{}: names `{name}`", rel.display()));
            }
        }
    }
    out
}

#[test]
fn only_vault_crosses_the_dek_bridge() {
    let src = source_root();
    let mut paths = Vec::new();
    rust_files(&src, &mut paths);
    let files: Vec<(PathBuf, String)> = paths
        .iter()
        .map(|p| {
            let rel = p.strip_prefix(&src).unwrap().to_path_buf();
            (rel, std::fs::read_to_string(p).unwrap())
        })
        .collect();
    let users = bridge_users(&files);
    assert!(
        users.is_empty(),
        "only Vault::wrap_dek / unwrap_dek may turn a Dek into a WrappedDek and back:\n{}",
        users.join("\n")
    );
    // The check can fail.
    let bad = bridge_users(&tree(&[(
        "keys/manager.rs",
        "fn f(d: &Dek) { let p = d.to_transit_plaintext(); }\n",
    )]));
    assert_eq!(bad.len(), 1, "{bad:?}");
}

/// The image's first build step (dependencies only) reads the whole manifest, and cargo refuses
/// a manifest whose targets are missing: every workspace member, the bench folder, the build
/// script and the protos must be copied before it, and every binary must exist (copied or a
/// stand-in written by the step). A target added to Cargo.toml without the Dockerfile broke
/// the image build once ("can't find `crypto` bench").
#[test]
fn the_image_build_has_every_target_the_manifest_names() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest: toml::Table = std::fs::read_to_string(root.join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let docker = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let first_build = docker
        .find("cargo build")
        .expect("the Dockerfile builds with cargo");
    let before = &docker[..first_build];
    let copied: BTreeSet<&str> = before
        .lines()
        .filter_map(|l| l.trim().strip_prefix("COPY "))
        .flat_map(|l| {
            let parts: Vec<&str> = l
                .split_whitespace()
                .filter(|p| !p.starts_with("--"))
                .collect();
            parts[..parts.len().saturating_sub(1)].to_vec()
        })
        .collect();
    let mut needed: Vec<String> = vec![
        "Cargo.toml".into(),
        "Cargo.lock".into(),
        "build.rs".into(),
        "proto".into(),
    ];
    if let Some(members) = manifest
        .get("workspace")
        .and_then(|w| w.get("members"))
        .and_then(|m| m.as_array())
    {
        needed.extend(
            members
                .iter()
                .filter_map(|m| m.as_str())
                .filter(|m| *m != ".")
                .map(String::from),
        );
    }
    if manifest.get("bench").is_some() {
        needed.push("benches".into());
    }
    let missing: Vec<&String> = needed
        .iter()
        .filter(|n| !copied.contains(n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "copied before the first build: {copied:?}; missing: {missing:?}"
    );
    for bin in manifest
        .get("bin")
        .and_then(|b| b.as_array())
        .into_iter()
        .flatten()
    {
        let path = bin["path"].as_str().unwrap();
        assert!(
            before.contains(path) || copied.iter().any(|c| path.starts_with(&format!("{c}/"))),
            "binary {path} has neither a stand-in nor a copy before the first build"
        );
    }
}

/// A store schema upgrade that moves data runs before piiguard listens, in one transaction
/// (the version-4 token move: ~30 s per million tokens on SQLite, docs/OPERATIONS.md). The
/// Kubernetes liveness probe once began after 30 s: a large store's upgrade was killed and
/// rolled back on every restart. The manifest must give a start at least 30 minutes through a
/// startup probe (liveness does not count until it succeeds) and start liveness no sooner.
#[test]
fn the_kubernetes_probes_let_a_long_store_upgrade_finish() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let yaml = std::fs::read_to_string(root.join("deploy/kubernetes/statefulset.yaml")).unwrap();
    // The `key: value` lines of the probe block `name:` (its deeper-indented lines).
    let probe = |name: &str| -> Option<Vec<(String, String)>> {
        let mut lines = yaml.lines().skip_while(|l| l.trim() != format!("{name}:"));
        let head = lines.next()?;
        let indent = head.len() - head.trim_start().len();
        Some(
            lines
                .take_while(|l| l.len() - l.trim_start().len() > indent)
                .filter_map(|l| l.trim().split_once(": "))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    };
    let num = |p: &[(String, String)], k: &str, default: u64| {
        p.iter()
            .find(|(key, _)| key == k)
            .map_or(default, |(_, v)| v.parse::<u64>().unwrap())
    };
    let startup = probe("startupProbe").expect("a startup probe");
    let budget = num(&startup, "periodSeconds", 10) * num(&startup, "failureThreshold", 3)
        + num(&startup, "initialDelaySeconds", 0);
    assert!(budget >= 1800, "the startup probe allows {budget} s");
    let liveness = probe("livenessProbe").expect("a liveness probe");
    assert!(liveness.iter().any(|(k, _)| k == "grpc"));
}
