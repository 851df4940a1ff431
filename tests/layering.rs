//! The layering of `src/`, checked: the one list of its top-level modules by layer, and the
//! test that fails when the code imports against it.
//!
//! Rule 1: a top-level module of `src/` may name (in a `use` or in any path) only modules
//! of lower layers: never a module of its own layer, never one above. Two modules that
//! need each other therefore cannot exist, and every module can be read knowing only
//! those below it. A new module must be given a layer here before the test passes.
//!
//! Rule 2: an HTTP handler module under `src/http/` never names another handler module:
//! what two handlers share lives in a support module of `http` (errors, parameter checks,
//! auth) or below `http` altogether.
//!
//! The checker reads the sources as text: comments, string and character literals, and
//! `#[cfg(test)]` items are left out (test code is not part of the service's dependency
//! graph: a test module may build fixtures with anything), and every `crate::` and
//! `super::` path (with `use` groups `{a, b::c}`) is resolved to the module it names.
//! `main.rs` (the binary, which sees the library from outside) and `lib.rs` (which only
//! declares the modules) are not checked. This file must never depend on the crate it
//! checks: it is plain text processing, so it compiles and runs on its own.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The top-level modules of `src/`, bottom layer first. Each may import only modules of
/// the layers before its own.
const LAYERS: &[&[&str]] = &[
    // 0. Leaves that know nothing of the service: the error-chain formatter, what a
    //    database error means (refused or transient), typed settings from the
    //    environment, logging set-up, the retry delays, the transition table rendered
    //    for people, and a long command's progress display.
    &[
        "backoff",
        "config",
        "db_error",
        "error_chain",
        "progress",
        "telemetry",
        "transitions",
    ],
    // 1. The outside world's formats and connections: Stripe's wire formats, signatures
    //    and API client; the Postgres pool and migrations.
    &["db", "stripe"],
    // 2. The owners of tables and of the log: the inbox (table `inbox`), the ledger
    //    (commands through the aggregate, events through `event_store`), the sync log
    //    (tables `sync_attempts`, `sync_customers`), the notifier and its sender (tables
    //    `notifications`, `notification_state`, `notification_checkpoint`).
    &["inbox", "ledger", "notify", "sync_log"],
    // 3. The domain metrics: counters and gauges labelled by the enums of layer 2.
    &["metrics"],
    // 4. The read-model handle: Redis first, then the Postgres tables, written back.
    &["reads"],
    // 5. The processes that move facts in: the inbox worker (claim, route, ledger, mark;
    //    asks sync_log for a sync) and the syncer (Stripe's API, ledger, sync_log, reads).
    &["sync", "worker"],
    // 6. What people and clients ask for: checkout and portal rules, a customer's whole
    //    story for operators, importing events from a file.
    &["billing", "import", "inspect", "recovery", "setup"],
    // 7. The HTTP surface: handlers, router, `GET /metrics`, the admin page.
    &["http"],
    // 8. Wiring: the services and the application that runs them.
    &["startup"],
];

/// The modules of `src/http/` that handle requests: none of them may name another.
const HTTP_HANDLERS: &[&str] = &[
    "admin", "api", "checkout", "health", "metrics", "ops", "webhook",
];

/// The modules of `src/http/` that the handlers share (they name no handler either).
const HTTP_SUPPORT: &[&str] = &["auth", "error", "layers", "params", "serve"];

#[test]
fn src_follows_the_layers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = read_sources(&root);
    assert!(files.len() > 10, "read the sources of {}", root.display());
    let problems = check(&files, LAYERS, HTTP_HANDLERS, HTTP_SUPPORT);
    assert!(
        problems.is_empty(),
        "src/ imports against its layers (tests/layering.rs lists them):\n{}",
        problems.join("\n")
    );
}

/// Every `.rs` file under `root` but `lib.rs` and `main.rs`, as (path under `root`, text).
fn read_sources(root: &Path) -> Vec<(PathBuf, String)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, String)>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.expect("a directory entry").path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(root, &path, out);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                let relative = path.strip_prefix(root).expect("under root").to_owned();
                if relative != Path::new("lib.rs") && relative != Path::new("main.rs") {
                    let text = std::fs::read_to_string(&path)
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    out.push((relative, text));
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out
}

/// Everything the sources import against the rules, one line each (empty: all is well).
fn check(
    files: &[(PathBuf, String)],
    layers: &[&[&str]],
    handlers: &[&str],
    support: &[&str],
) -> Vec<String> {
    let layer_of = |module: &str| layers.iter().position(|layer| layer.contains(&module));
    let mut problems = BTreeSet::new();
    let mut seen_top = BTreeSet::new();
    let test_only = test_only_files(files);
    for (path, text) in files {
        let module = module_path(path);
        if test_only.iter().any(|prefix| module.starts_with(prefix)) {
            continue;
        }
        let top = module[0].clone();
        seen_top.insert(top.clone());
        let Some(own_layer) = layer_of(&top) else {
            problems.insert(format!(
                "src/{}: module `{top}` has no layer: add it to LAYERS",
                path.display()
            ));
            continue;
        };
        let in_http = top == "http" && module.len() > 1;
        if in_http
            && !handlers.contains(&module[1].as_str())
            && !support.contains(&module[1].as_str())
        {
            problems.insert(format!(
                "src/{}: `http::{}` is neither a handler nor a support module: list it",
                path.display(),
                module[1]
            ));
        }
        for named in named_modules(&module, &strip_test_items(&code_only(text))) {
            let target = &named[0];
            if *target != top {
                match layer_of(target) {
                    Some(layer) if layer < own_layer => {}
                    Some(layer) => {
                        problems.insert(format!(
                            "src/{}: `{top}` (layer {own_layer}) names `{target}` (layer {layer}): a module may name only lower layers",
                            path.display()
                        ));
                    }
                    None => {
                        problems.insert(format!(
                            "src/{}: `{top}` names `{target}`, which has no layer",
                            path.display()
                        ));
                    }
                }
            } else if in_http && named.len() > 1 && named[1] != module[1] {
                let target = named[1].as_str();
                if handlers.contains(&target) {
                    problems.insert(format!(
                        "src/{}: `http::{}` names the handler module `http::{target}`: handlers never name each other",
                        path.display(),
                        module[1]
                    ));
                }
            }
        }
    }
    for layer in layers {
        for module in *layer {
            if !seen_top.contains(*module) {
                problems.insert(format!("LAYERS lists `{module}`, which src/ does not have"));
            }
        }
    }
    problems.into_iter().collect()
}

/// The module a file is: `inbox/work.rs` is `inbox::work`, `http/admin/mod.rs` is
/// `http::admin`.
fn module_path(path: &Path) -> Vec<String> {
    let mut parts: Vec<String> = path
        .iter()
        .map(|part| part.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().expect("a file name");
    if last != "mod.rs" {
        parts.push(last.trim_end_matches(".rs").to_owned());
    }
    parts
}

/// Modules declared `#[cfg(test)] mod name;` (in their own file): test code, skipped.
fn test_only_files(files: &[(PathBuf, String)]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for (path, text) in files {
        let tokens = tokens(&code_only(text));
        for (i, _) in tokens.iter().enumerate() {
            if let Some(end) = cfg_test_at(&tokens, i) {
                let rest: Vec<&str> = tokens[end..].iter().map(String::as_str).collect();
                let name = match rest.as_slice() {
                    ["mod", name, ";", ..] | ["pub", "mod", name, ";", ..] => Some(*name),
                    _ => None,
                };
                if let Some(name) = name {
                    let mut module = module_path(path);
                    module.push(name.to_owned());
                    out.push(module);
                }
            }
        }
    }
    out
}

/// The text with comments and the contents of string and character literals blanked out
/// (newlines kept), so that only code is left to read paths from.
fn code_only(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            // Block comments nest in Rust.
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if let Some((body, hashes)) = raw_string_at(&chars, i) {
            out.extend(chars[i..body].iter());
            i = body;
            let closing: Vec<char> = std::iter::once('"')
                .chain(std::iter::repeat_n('#', hashes))
                .collect();
            while i < chars.len() && !chars[i..].starts_with(&closing) {
                out.push(blank(chars[i]));
                i += 1;
            }
            if i < chars.len() {
                out.extend(closing.iter());
            }
            i += closing.len();
        } else if c == '"' {
            out.push('"');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < chars.len() {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
            out.push('"');
            i += 1;
        } else if c == '\'' && (next == Some('\\') || chars.get(i + 2) == Some(&'\'')) {
            // A character literal ('x', '\n', '\''); otherwise a lifetime, kept.
            out.push('\'');
            i += 1;
            if chars.get(i) == Some(&'\\') {
                // The escape and the character it escapes (which may be a quote).
                out.push_str("  ");
                i += 2;
            }
            while i < chars.len() && chars[i] != '\'' {
                out.push(blank(chars[i]));
                i += 1;
            }
            out.push('\'');
            i += 1;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// When a raw string (`r"…"`, `r#"…"#`, `br"…"`) starts at `chars[i]`: where its body
/// starts, and how many `#` close it.
fn raw_string_at(chars: &[char], i: usize) -> Option<(usize, usize)> {
    let ident_before = i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_');
    let start = match (chars[i], chars.get(i + 1)) {
        _ if ident_before => return None,
        ('r', _) => i + 1,
        ('b', Some('r')) => i + 2,
        _ => return None,
    };
    let hashes = chars[start..].iter().take_while(|&&h| h == '#').count();
    (chars.get(start + hashes) == Some(&'"')).then_some((start + hashes + 1, hashes))
}

/// Identifiers, `::`, and every other character but whitespace as its own token.
fn tokens(code: &str) -> Vec<String> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push(chars[start..i].iter().collect());
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            out.push("::".to_owned());
            i += 2;
        } else {
            out.push(c.to_string());
            i += 1;
        }
    }
    out
}

/// When the tokens at `i` are `#[cfg(test)]`, the index just after it.
fn cfg_test_at(tokens: &[String], i: usize) -> Option<usize> {
    let pattern = ["#", "[", "cfg", "(", "test", ")", "]"];
    let matches = tokens.len() >= i + pattern.len()
        && pattern
            .iter()
            .zip(&tokens[i..])
            .all(|(want, got)| want == got);
    matches.then_some(i + pattern.len())
}

/// The tokens of `code` without its `#[cfg(test)]` items (the attribute, any further
/// attributes, and the item up to its `;` or its closing brace).
fn strip_test_items(code: &str) -> Vec<String> {
    let all = tokens(code);
    let mut out = Vec::with_capacity(all.len());
    let mut i = 0;
    while i < all.len() {
        let Some(mut j) = cfg_test_at(&all, i) else {
            out.push(all[i].clone());
            i += 1;
            continue;
        };
        let mut depth = 0usize;
        while j < all.len() {
            match all[j].as_str() {
                "{" | "[" | "(" => depth += 1,
                "}" | "]" | ")" => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 && all[j] == "}" {
                        j += 1;
                        break;
                    }
                }
                ";" if depth == 0 => {
                    j += 1;
                    break;
                }
                _ => {}
            }
            j += 1;
        }
        i = j;
    }
    out
}

/// The modules that `tokens` (of the file that is module `module`) name through `crate::`
/// and `super::` paths, each as its first two segments from the crate root (or one, when
/// the path stops there).
fn named_modules(module: &[String], tokens: &[String]) -> BTreeSet<Vec<String>> {
    let mut out = BTreeSet::new();
    for i in 0..tokens.len() {
        // `a::crate` is no path from the root, and `$crate` is a macro's.
        let after_path = i > 0 && (tokens[i - 1] == "::" || tokens[i - 1] == "$");
        let base: Vec<String> = match tokens[i].as_str() {
            "crate" if !after_path && tokens.get(i + 1).is_some_and(|t| t == "::") => Vec::new(),
            "super" if !after_path => module.to_vec(),
            _ => continue,
        };
        // `super::super::…`: one level up for each.
        let mut base = base;
        let mut j = i;
        if tokens[i] == "super" {
            while tokens.get(j).is_some_and(|t| t == "super")
                && tokens.get(j + 1).is_some_and(|t| t == "::")
            {
                base.pop();
                j += 2;
            }
            if j == i {
                continue;
            }
        } else {
            j += 2;
        }
        for path in use_tree(tokens, j, base) {
            if !path.is_empty() {
                out.insert(path.into_iter().take(2).collect());
            }
        }
    }
    out
}

/// The paths a use tree (or an expression's path) starting at `tokens[i]` names, each
/// `prefix` followed by its segments: `a::b`, `{a, b::{c, d}}`, `a::*`.
fn use_tree(tokens: &[String], i: usize, prefix: Vec<String>) -> Vec<Vec<String>> {
    match tokens.get(i).map(String::as_str) {
        Some("{") => {
            let mut paths = Vec::new();
            let mut j = i + 1;
            let mut depth = 0usize;
            let mut item_start = true;
            while j < tokens.len() {
                match tokens[j].as_str() {
                    "}" if depth == 0 => break,
                    "{" => depth += 1,
                    "}" => depth -= 1,
                    "," if depth == 0 => {
                        item_start = true;
                        j += 1;
                        continue;
                    }
                    _ => {}
                }
                if item_start && depth == 0 {
                    if tokens[j] == "self" {
                        paths.push(prefix.clone());
                    } else {
                        paths.extend(use_tree(tokens, j, prefix.clone()));
                    }
                    item_start = false;
                }
                j += 1;
            }
            paths
        }
        Some(segment) if segment.starts_with(|c: char| c.is_alphabetic() || c == '_') => {
            let mut path = prefix;
            path.push(segment.to_owned());
            if tokens.get(i + 1).is_some_and(|t| t == "::")
                && tokens
                    .get(i + 2)
                    .is_some_and(|t| t != "<" && t != "*" && path.len() < 2)
            {
                use_tree(tokens, i + 2, path)
            } else {
                vec![path]
            }
        }
        _ => vec![prefix],
    }
}

/// The checker itself, on small made-up trees: it must see what it is meant to see (and
/// fail), and nothing else.
mod checker {
    use super::*;

    fn files(sources: &[(&str, &str)]) -> Vec<(PathBuf, String)> {
        sources
            .iter()
            .map(|(path, text)| (PathBuf::from(path), (*text).to_owned()))
            .collect()
    }

    const TWO: &[&[&str]] = &[&["low"], &["high"]];

    #[test]
    fn an_import_circle_fails() {
        let tree = files(&[
            ("low.rs", "use crate::high::Thing;\npub struct Other;"),
            ("high.rs", "use crate::low::Other;\npub struct Thing;"),
        ]);
        let problems = check(&tree, TWO, &[], &[]);
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(
            problems[0].contains("`low` (layer 0) names `high` (layer 1)"),
            "{problems:#?}"
        );
        // Two modules of one layer that name each other fail on both sides.
        let problems = check(&tree, &[&["low", "high"]], &[], &[]);
        assert_eq!(problems.len(), 2, "{problems:#?}");
    }

    #[test]
    fn downward_imports_pass_and_every_module_needs_a_layer() {
        let tree = files(&[
            ("low.rs", "pub fn f() {}"),
            ("high/mod.rs", "pub mod inner;\nfn g() { crate::low::f() }"),
            ("high/inner.rs", "use crate::{low, high::other};"),
        ]);
        assert_eq!(check(&tree, TWO, &[], &[]), Vec::<String>::new());
        let problems = check(&tree, &[&["high"]], &[], &[]);
        assert!(
            problems.iter().any(|p| p.contains("`low` has no layer")),
            "{problems:#?}"
        );
        let problems = check(&tree, &[&["low"], &["high"], &["gone"]], &[], &[]);
        assert!(
            problems.iter().any(|p| p.contains("lists `gone`")),
            "{problems:#?}"
        );
    }

    #[test]
    fn groups_nested_paths_and_super_chains_are_resolved() {
        let tree = files(&[
            ("low/mod.rs", "pub mod deep;"),
            ("low/deep.rs", "use super::super::high::X;"),
            ("high.rs", "pub struct X;"),
        ]);
        let problems = check(&tree, TWO, &[], &[]);
        assert_eq!(problems.len(), 1, "{problems:#?}");
        let tree = files(&[
            ("low.rs", "use crate::{a::b, high::{self, X}};"),
            ("high.rs", ""),
        ]);
        let problems = check(&tree, TWO, &[], &[]);
        assert!(
            problems.iter().any(|p| p.contains("names `high`")),
            "{problems:#?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("names `a`, which has no layer")),
            "{problems:#?}"
        );
    }

    #[test]
    fn comments_literals_and_test_items_are_not_code() {
        let tree = files(&[
            (
                "low.rs",
                r##"
//! See [`crate::high`] for more. /* crate::high */
/// Uses `crate::high::X`.
const SQL: &str = "SELECT 'crate::high::X'";
const RAW: &str = r#"crate::high "quoted" crate::high"#;
const QUOTE: char = '"';
const ESCAPED: [char; 2] = ['\'', '\\'];
const AFTER: &str = "crate::high";
fn f<'a>(x: &'a str) -> &'a str { let _ = "\" crate::high"; x }

#[cfg(test)]
mod tests {
    use crate::high::X;
    fn g() { let _ = crate::high::X; }
}

#[cfg(test)]
use crate::high::Y;
"##,
            ),
            ("high.rs", ""),
        ]);
        assert_eq!(check(&tree, TWO, &[], &[]), Vec::<String>::new());
    }

    #[test]
    fn http_handlers_never_name_each_other() {
        let layers: &[&[&str]] = &[&["http"]];
        let handlers = &["checkout", "api"];
        let support = &["params", "error"];
        let tree = files(&[
            (
                "http/mod.rs",
                "pub mod api; pub mod checkout; use self::api::x;",
            ),
            (
                "http/api.rs",
                "use super::params::valid_id;\nuse super::{ApiError, AppState};",
            ),
            ("http/params.rs", ""),
            ("http/error.rs", ""),
            ("http/checkout.rs", "use super::api::read_customer;"),
        ]);
        let problems = check(&tree, layers, handlers, support);
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(
            problems[0].contains("`http::checkout` names the handler module `http::api`"),
            "{problems:#?}"
        );
        // Through `crate::http::…` too, and a module that is neither kind is reported.
        let tree = files(&[
            ("http/checkout.rs", "fn f() { crate::http::api::read(); }"),
            ("http/api.rs", ""),
            ("http/extra.rs", ""),
        ]);
        let problems = check(&tree, layers, handlers, support);
        assert_eq!(problems.len(), 2, "{problems:#?}");
    }
}
