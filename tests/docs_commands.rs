//! The documented runner commands against the current CLI. README.md, ARCHITECTURE.md and
//! docs/*.md show many `cargo run --release --example llama -- <subcommand> --flag ...` and
//! `llama <subcommand> ...` lines, in fenced shell blocks (with `\` continuations, shell
//! variables such as `B="cargo run ... -- eval --tp 8"` then `$B --out x.json`, loops) and
//! inline in prose (`` `sweep --tps 8 --resume` ``, a code span that may wrap over lines).
//! For every one of them: the subcommand exists and every option it passes is listed in that
//! subcommand's `--help` (the built example, so the CLI is what the code says today). Option
//! lists in prose (`` `--distill-calib 72 --holdout 8` ``) must name an option of some
//! subcommand (or of a script in scripts/, or cargo's); `scripts/*.sh|py` named anywhere must
//! exist. Commands of other tools (python3, cargo test/bench, nvcc, ...) are not checked.
//! Every problem is reported with file:line, all of them in one run.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::process::Command;

/// What the runner accepts: its top-level options, subcommands and each one's options.
#[derive(Debug, Default)]
struct CliSpec {
    top: BTreeSet<String>,
    subs: BTreeMap<String, BTreeSet<String>>,
}

/// One shell word of a documented command and the document line it is on.
#[derive(Debug, Clone, PartialEq)]
struct Word {
    text: String,
    line: usize,
    /// Began with an unquoted `$`: after expansion it splits into words, as in a shell.
    dollar: bool,
}

/// A runner command found in a document: the words after `llama` (or after `--` in a
/// `cargo run --example llama -- ...` line), or a whole inline span that starts with a
/// subcommand name (`` `plan --past-wall 8` ``).
#[derive(Debug, Clone)]
struct DocCommand {
    line: usize,
    args: Vec<Word>,
    inline: bool,
    /// An inline span without `llama` in front: its first word was taken as the subcommand.
    bare: bool,
}

#[derive(Debug, Default)]
struct Parsed {
    commands: Vec<DocCommand>,
    /// Inline spans that are only options (`` `--wire bf16` ``).
    loose_flags: Vec<Word>,
    /// (line, path from the repository root) of each referenced script.
    scripts: Vec<(usize, String)>,
}

/// First words of inline spans that are other programs, not runner subcommands.
const OTHER_TOOLS: &[&str] = &[
    "cargo",
    "rustc",
    "rustup",
    "rustfmt",
    "python",
    "python3",
    "pip",
    "pip3",
    "nvcc",
    "ptxas",
    "cuobjdump",
    "nvidia-smi",
    "nsys",
    "ncu",
    "git",
    "cd",
    "sh",
    "bash",
    "env",
    "make",
    "cmake",
    "curl",
    "wget",
    "torchrun",
    "sed",
    "grep",
    "ls",
    "cat",
    "echo",
    "export",
    "time",
    "nice",
    "sudo",
    "apt",
    "apt-get",
    "docker",
    "ssh",
    "scp",
    "rsync",
    "tee",
    "huggingface-cli",
];

/// Options of cargo that prose names (`--features cuda`); not the runner's.
const CARGO_FLAGS: &[&str] = &[
    "--release",
    "--features",
    "--example",
    "--test",
    "--bench",
    "--all-targets",
    "--ignored",
    "--nocapture",
    "--lib",
    "--bins",
    "--workspace",
    "--no-run",
    "--doc",
    "--test-threads",
];

/// Fenced blocks in these languages are read as shell.
const SHELL_LANGS: &[&str] = &["", "sh", "bash", "shell", "console", "zsh", "shell-session"];

// ---------------------------------------------------------------------------------------
// Markdown

fn parse_doc(text: &str) -> Parsed {
    let mut out = Parsed::default();
    let lines: Vec<&str> = text.lines().collect();
    let mut para: Vec<(usize, &str)> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if let Some((ch, n, lang)) = fence_open(lines[i]) {
            inline_spans(&para, &mut out);
            para.clear();
            let mut body = Vec::new();
            i += 1;
            while i < lines.len() && !fence_close(lines[i], ch, n) {
                body.push((i + 1, lines[i]));
                i += 1;
            }
            i += 1;
            if SHELL_LANGS.contains(&lang.as_str()) {
                shell_block(&body, &mut out);
            }
            continue;
        }
        if lines[i].trim().is_empty() {
            inline_spans(&para, &mut out);
            para.clear();
        } else {
            para.push((i + 1, lines[i]));
        }
        i += 1;
    }
    inline_spans(&para, &mut out);
    for (i, line) in lines.iter().enumerate() {
        for p in script_paths(line) {
            out.scripts.push((i + 1, p));
        }
    }
    out
}

/// An opening fence: its character, its length and the info string's first word.
fn fence_open(line: &str) -> Option<(char, usize, String)> {
    let t = line.trim_start();
    let ch = t.chars().next().filter(|c| *c == '`' || *c == '~')?;
    let n = t.chars().take_while(|c| *c == ch).count();
    if n < 3 {
        return None;
    }
    let info = t[n..].trim();
    if ch == '`' && info.contains('`') {
        return None;
    }
    let lang = info.split_whitespace().next().unwrap_or("").to_lowercase();
    Some((ch, n, lang))
}

fn fence_close(line: &str, ch: char, n: usize) -> bool {
    let t = line.trim();
    t.chars().take_while(|c| *c == ch).count() >= n && t.chars().all(|c| c == ch)
}

/// The code spans of one paragraph (a span may wrap over its lines; a line break in it is
/// a space), each handed to [`inline`].
fn inline_spans(para: &[(usize, &str)], out: &mut Parsed) {
    if para.is_empty() {
        return;
    }
    let (s, line_at) = join_lines(para.iter().map(|(ln, l)| (*ln, *l)));
    spans(&s, &line_at, out);
}

/// `pieces` (line number, text) joined with spaces, and the map from an offset in the joined
/// text to the line it came from. `pieces` is not empty.
fn join_lines<'a>(
    pieces: impl Iterator<Item = (usize, &'a str)>,
) -> (String, impl Fn(usize) -> usize) {
    let mut s = String::new();
    let mut starts = Vec::new();
    for (ln, p) in pieces {
        starts.push((s.len(), ln));
        s.push_str(p);
        s.push(' ');
    }
    let line_at = move |off: usize| -> usize {
        starts
            .iter()
            .take_while(|(st, _)| *st <= off)
            .last()
            .map_or(starts[0].1, |(_, ln)| *ln)
    };
    (s, line_at)
}

/// Code spans in `s` (CommonMark: a run of n backticks up to the next run of exactly n).
fn spans(s: &str, line_at: &dyn Fn(usize) -> usize, out: &mut Parsed) {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            i += 2;
            continue;
        }
        if b[i] != b'`' {
            i += 1;
            continue;
        }
        let n = b[i..].iter().take_while(|c| **c == b'`').count();
        let open = i + n;
        let mut j = open;
        let mut close = None;
        while j < b.len() {
            if b[j] == b'`' {
                let m = b[j..].iter().take_while(|c| **c == b'`').count();
                if m == n {
                    close = Some(j);
                    break;
                }
                j += m;
            } else {
                j += 1;
            }
        }
        match close {
            Some(c) => {
                let words = shell_words(&s[open..c], open, line_at);
                inline(words, line_at(open), out);
                i = c + n;
            }
            None => i = open,
        }
    }
}

/// One inline code span, as words.
fn inline(words: Vec<Word>, line: usize, out: &mut Parsed) {
    let words = strip_env(words);
    let Some(first) = words.first() else { return };
    if let Some(args) = runner_args(&words) {
        out.commands.push(DocCommand {
            line,
            args,
            inline: true,
            bare: false,
        });
    } else if first.text.starts_with("--") {
        out.loose_flags
            .extend(words.into_iter().filter(|w| w.text.starts_with("--")));
    } else if words.len() == 1
        && !first.text.contains('/')
        && (first.text.ends_with(".sh") || first.text.ends_with(".py"))
    {
        out.scripts.push((line, format!("scripts/{}", first.text)));
    } else if is_ident(&first.text)
        && !OTHER_TOOLS.contains(&first.text.as_str())
        && words.iter().any(|w| w.text.starts_with("--"))
    {
        out.commands.push(DocCommand {
            line,
            args: words,
            inline: true,
            bare: true,
        });
    }
}

/// `scripts/NAME.sh` / `scripts/NAME.py` mentioned on a line (also `../../scripts/x.py`).
fn script_paths(line: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (i, _) in line.match_indices("scripts/") {
        let prev = line[..i].chars().last();
        if prev.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '-') {
            continue;
        }
        let rest = &line[i + "scripts/".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || "_.-/".contains(*c))
            .collect();
        let name = name.trim_end_matches('.');
        if name.ends_with(".sh") || name.ends_with(".py") {
            found.push(format!("scripts/{name}"));
        }
    }
    found
}

// ---------------------------------------------------------------------------------------
// Shell

/// A fenced shell block: `\` continuations joined, comments dropped (code spans in them are
/// read as prose), `;`/`&&`/`|` separate commands, `NAME=value` assignments expanded later.
fn shell_block(body: &[(usize, &str)], out: &mut Parsed) {
    let mut vars: HashMap<String, String> = HashMap::new();
    let mut pieces: Vec<(usize, String)> = Vec::new();
    for (ln, raw) in body {
        let l = raw.trim_start();
        let l = l.strip_prefix("$ ").unwrap_or(l);
        let (code, comment) = split_comment(l);
        if let Some(c) = comment {
            spans(c, &|_| *ln, out);
        }
        let code = code.trim_end();
        if let Some(cont) = code.strip_suffix('\\') {
            pieces.push((*ln, cont.to_string()));
            continue;
        }
        pieces.push((*ln, code.to_string()));
        logical_line(&pieces, &mut vars, out);
        pieces.clear();
    }
    logical_line(&pieces, &mut vars, out);
}

fn logical_line(pieces: &[(usize, String)], vars: &mut HashMap<String, String>, out: &mut Parsed) {
    if pieces.is_empty() {
        return;
    }
    let (s, line_at) = join_lines(pieces.iter().map(|(ln, p)| (*ln, p.as_str())));
    for (a, b) in segments(&s) {
        let mut words = shell_words(&s[a..b], a, &line_at);
        // Compound-command keywords: `for x in ...` itself runs nothing.
        while let Some(w) = words.first() {
            match w.text.as_str() {
                "do" | "then" | "else" | "if" | "while" | "until" | "!" | "{" | "(" | "time" => {
                    words.remove(0);
                }
                _ => break,
            }
        }
        let Some(first) = words.first() else { continue };
        if matches!(
            first.text.as_str(),
            "for" | "done" | "fi" | "}" | ")" | "case" | "esac"
        ) {
            continue;
        }
        if words.iter().all(|w| assignment(&w.text).is_some()) {
            for w in &words {
                let (name, value) = assignment(&w.text).unwrap();
                let value = expand(value, vars);
                vars.insert(name.to_string(), value);
            }
            continue;
        }
        let words = strip_env(expand_words(words, vars));
        if let Some(args) = runner_args(&words) {
            out.commands.push(DocCommand {
                line: pieces[0].0,
                args,
                inline: false,
                bare: false,
            });
        }
    }
}

/// `#` at the start of a word outside quotes begins a comment.
fn split_comment(l: &str) -> (&str, Option<&str>) {
    let (mut sq, mut dq, mut prev_space, mut esc) = (false, false, true, false);
    for (i, c) in l.char_indices() {
        if esc {
            esc = false;
            prev_space = false;
            continue;
        }
        match c {
            '\\' if !sq => esc = true,
            '\'' if !dq => sq = !sq,
            '"' if !sq => dq = !dq,
            '#' if !sq && !dq && prev_space => return (&l[..i], Some(&l[i + 1..])),
            _ => {}
        }
        prev_space = c.is_whitespace();
    }
    (l, None)
}

/// Byte ranges of the simple commands of a line: split at `;`, `&`, `|` outside quotes.
fn segments(s: &str) -> Vec<(usize, usize)> {
    let (mut sq, mut dq, mut esc, mut start) = (false, false, false, 0);
    let mut out = Vec::new();
    for (i, c) in s.char_indices() {
        if esc {
            esc = false;
            continue;
        }
        match c {
            '\\' if !sq => esc = true,
            '\'' if !dq => sq = !sq,
            '"' if !sq => dq = !dq,
            ';' | '&' | '|' if !sq && !dq => {
                out.push((start, i));
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push((start, s.len()));
    out.retain(|(a, b)| !s[*a..*b].trim().is_empty());
    out
}

/// Shell words of `s` (quotes removed, `\x` -> `x`); `base` is `s`'s offset for `line_at`.
fn shell_words(s: &str, base: usize, line_at: &dyn Fn(usize) -> usize) -> Vec<Word> {
    let mut words = Vec::new();
    let mut cur: Option<Word> = None;
    let (mut sq, mut dq, mut esc) = (false, false, false);
    for (i, c) in s.char_indices() {
        if !esc && !sq && !dq && c.is_whitespace() {
            words.extend(cur.take());
            continue;
        }
        // A word starts at its first character, even a quote: `""` is an (empty) word.
        let w = cur.get_or_insert_with(|| Word {
            text: String::new(),
            line: line_at(base + i),
            dollar: c == '$',
        });
        if esc {
            w.text.push(c);
            esc = false;
            continue;
        }
        match c {
            '\\' if !sq => esc = true,
            '\'' if !dq => sq = !sq,
            '"' if !sq => dq = !dq,
            c => w.text.push(c),
        }
    }
    words.extend(cur);
    words
}

/// `NAME=value` -> (NAME, value).
fn assignment(w: &str) -> Option<(&str, &str)> {
    let (name, value) = w.split_once('=')?;
    let ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    ok.then_some((name, value))
}

/// Leading `NAME=value` words (an environment for the command) dropped.
fn strip_env(mut words: Vec<Word>) -> Vec<Word> {
    let n = words
        .iter()
        .take_while(|w| assignment(&w.text).is_some())
        .count();
    if n < words.len() {
        words.drain(..n);
    }
    words
}

/// `$NAME` and `${NAME}` of known variables replaced; anything else left as written.
fn expand(s: &str, vars: &HashMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, len) = if let Some(inner) = after.strip_prefix('{') {
            match inner.find('}') {
                Some(j) => (&inner[..j], j + 2),
                None => ("", 0),
            }
        } else {
            let j = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..j], j)
        };
        match vars.get(name) {
            Some(v) if !name.is_empty() => {
                out.push_str(v);
                rest = &after[len..];
            }
            _ => {
                out.push('$');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

fn expand_words(words: Vec<Word>, vars: &HashMap<String, String>) -> Vec<Word> {
    let mut out = Vec::new();
    for w in words {
        let text = expand(&w.text, vars);
        if w.dollar && text != w.text {
            out.extend(text.split_whitespace().map(|t| Word {
                text: t.to_string(),
                line: w.line,
                dollar: false,
            }));
        } else {
            out.push(Word { text, ..w });
        }
    }
    out
}

/// The runner's arguments if `words` run the runner: `llama ...`, `path/to/llama ...`, or
/// `cargo run ... --example llama [-- ...]`.
fn runner_args(words: &[Word]) -> Option<Vec<Word>> {
    let first = words.first()?.text.as_str();
    if first == "llama" || first.ends_with("/llama") {
        return Some(words[1..].to_vec());
    }
    if first != "cargo" || words.get(1).map(|w| w.text.as_str()) != Some("run") {
        return None;
    }
    let dashdash = words
        .iter()
        .position(|w| w.text == "--")
        .unwrap_or(words.len());
    let cargo = &words[..dashdash];
    let example = cargo
        .windows(2)
        .any(|p| p[0].text == "--example" && p[1].text == "llama")
        || cargo.iter().any(|w| w.text == "--example=llama");
    example.then(|| words.get(dashdash + 1..).unwrap_or_default().to_vec())
}

fn is_ident(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

// ---------------------------------------------------------------------------------------
// Checking

/// An option word (`--flag`, `--flag=value`, `-n`) -> the name `--help` lists; None for
/// values (negative numbers, `-`).
fn option_name(w: &str) -> Option<&str> {
    if let Some(long) = w.strip_prefix("--") {
        return (!long.is_empty()).then(|| w.split('=').next().unwrap());
    }
    let short = w.strip_prefix('-')?;
    (short.len() == 1 && short.chars().all(|c| c.is_ascii_alphabetic())).then_some(w)
}

/// Every problem of one document's commands, option lists and script references.
fn check(
    spec: &CliSpec,
    file: &str,
    parsed: &Parsed,
    foreign_flag: &dyn Fn(&str) -> bool,
    script_exists: &dyn Fn(&str) -> bool,
) -> Vec<String> {
    let mut bad = Vec::new();
    for cmd in &parsed.commands {
        let shown = cmd
            .args
            .iter()
            .map(|w| w.text.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        let mut sub: Option<&str> = None;
        for w in &cmd.args {
            let t = w.text.as_str();
            if t == "--" {
                break;
            }
            match sub {
                None if !t.starts_with('-') => {
                    if t.starts_with(['<', '[', '$', '{']) {
                        break; // a placeholder such as <COMMAND>
                    }
                    if !spec.subs.contains_key(t) {
                        let hint = if cmd.bare {
                            " (if this span is another program's command, add it to OTHER_TOOLS)"
                        } else {
                            ""
                        };
                        bad.push(format!(
                            "{file}:{}: `llama {t}`: no such subcommand (the runner has: {}) in `{shown}`{hint}",
                            w.line,
                            spec.subs.keys().cloned().collect::<Vec<_>>().join(", ")
                        ));
                        break;
                    }
                    sub = Some(t);
                }
                None => {
                    if let Some(o) = option_name(t) {
                        if !spec.top.contains(o) {
                            bad.push(format!(
                                "{file}:{}: `llama {o}`: not an option of `llama --help` (before any subcommand) in `{shown}`",
                                w.line
                            ));
                            break;
                        }
                    }
                }
                Some(s) => {
                    if let Some(o) = option_name(t) {
                        if !spec.subs[s].contains(o) {
                            bad.push(format!(
                                "{file}:{}: `{o}` is not an option of `llama {s} --help` in `{shown}`",
                                w.line
                            ));
                        }
                    }
                }
            }
        }
    }
    let all: BTreeSet<&String> = spec.subs.values().flatten().chain(&spec.top).collect();
    for w in &parsed.loose_flags {
        let Some(o) = option_name(&w.text) else {
            continue;
        };
        if !all.contains(&o.to_string()) && !foreign_flag(o) {
            bad.push(format!(
                "{file}:{}: `{o}` (named in the text) is an option of no runner subcommand, no script in scripts/ and not of cargo",
                w.line
            ));
        }
    }
    for (line, path) in &parsed.scripts {
        if !script_exists(path) {
            bad.push(format!("{file}:{line}: `{path}` does not exist"));
        }
    }
    bad
}

// ---------------------------------------------------------------------------------------
// The runner's help

fn help(llama: &Path, sub: Option<&str>) -> String {
    let out = Command::new(llama)
        .args(sub)
        .arg("--help")
        .output()
        .expect("run the runner");
    assert!(
        out.status.success(),
        "`llama {} --help` failed: {}",
        sub.unwrap_or(""),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 help")
}

/// The option names of a clap help text (`  -n, --max-tokens <N>  ...` -> -n, --max-tokens).
fn options_in_help(help: &str) -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    for line in help.lines() {
        let t = line.trim_start();
        if !line.starts_with(' ') || !t.starts_with('-') {
            continue;
        }
        for word in t.split_whitespace() {
            let word = word.trim_end_matches(',');
            if word.starts_with('<') || word.starts_with('[') {
                continue;
            }
            match option_name(word) {
                Some(o) => {
                    set.insert(o.to_string());
                }
                None => break,
            }
        }
    }
    set
}

/// The subcommand names of the top-level help's `Commands:` section.
fn commands_in_help(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

fn cli_spec(llama: &Path) -> CliSpec {
    let top_help = help(llama, None);
    let mut spec = CliSpec {
        top: options_in_help(&top_help),
        ..Default::default()
    };
    for sub in commands_in_help(&top_help) {
        let opts = if sub == "help" {
            BTreeSet::new()
        } else {
            options_in_help(&help(llama, Some(&sub)))
        };
        assert!(
            sub == "help" || opts.contains("--help"),
            "no options read from `llama {sub} --help`"
        );
        spec.subs.insert(sub, opts);
    }
    assert!(
        spec.subs.len() > 1,
        "no subcommands read from `llama --help`:\n{top_help}"
    );
    spec
}

/// README.md, ARCHITECTURE.md and docs/*.md, as paths from the repository root.
fn doc_files(root: &Path) -> Vec<String> {
    let mut files = vec!["README.md".to_string(), "ARCHITECTURE.md".to_string()];
    let mut docs: Vec<String> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".md"))
        .map(|n| format!("docs/{n}"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// Whether `text` names `flag` as a whole word.
fn mentions(text: &str, flag: &str) -> bool {
    text.match_indices(flag).any(|(i, _)| {
        let next = text[i + flag.len()..].chars().next();
        let prev = text[..i].chars().last();
        !next.is_some_and(|c| c.is_alphanumeric() || c == '-' || c == '_')
            && !prev.is_some_and(|c| c.is_alphanumeric() || c == '-')
    })
}

/// The text of every script in scripts/ (their options are not the runner's).
fn scripts_text(root: &Path) -> String {
    let mut s = String::new();
    for e in std::fs::read_dir(root.join("scripts"))
        .expect("scripts/")
        .flatten()
    {
        if let Ok(t) = std::fs::read_to_string(e.path()) {
            s.push_str(&t);
        }
    }
    s
}

fn check_repo_doc(spec: &CliSpec, root: &Path, file: &str, text: &str) -> (Parsed, Vec<String>) {
    let scripts = scripts_text(root);
    let parsed = parse_doc(text);
    let foreign = |f: &str| CARGO_FLAGS.contains(&f) || mentions(&scripts, f);
    let exists = |p: &str| root.join(p).is_file();
    let bad = check(spec, file, &parsed, &foreign, &exists);
    (parsed, bad)
}

#[test]
fn documented_runner_commands_match_the_cli() {
    let Some(llama) = common::runner() else {
        eprintln!("skipped: the llama example is not built");
        return;
    };
    let spec = cli_spec(&llama);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut failures = Vec::new();
    let mut total = 0;
    for file in doc_files(root) {
        let text = std::fs::read_to_string(root.join(&file)).unwrap();
        let (parsed, bad) = check_repo_doc(&spec, root, &file, &text);
        let inline = parsed.commands.iter().filter(|c| c.inline).count();
        println!(
            "{file}: {} runner commands ({} in code blocks, {inline} inline), {} option lists, {} script references, {} problem(s)",
            parsed.commands.len(),
            parsed.commands.len() - inline,
            parsed.loose_flags.len(),
            parsed.scripts.len(),
            bad.len()
        );
        total += parsed.commands.len();
        failures.extend(bad);
    }
    assert!(
        total > 0,
        "no runner commands found in the docs: is the parser broken?"
    );
    assert!(
        failures.is_empty(),
        "{} problem(s) in the documented commands:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The check against the real CLI fails on a real README line with a misspelt option.
#[test]
fn a_bogus_option_on_a_real_readme_line_is_reported() {
    let Some(llama) = common::runner() else {
        eprintln!("skipped: the llama example is not built");
        return;
    };
    let spec = cli_spec(&llama);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let (n, _) = readme
        .lines()
        .enumerate()
        .find(|(_, l)| l.contains("--example llama -- plan --tp 4 --budget-acc 1"))
        .expect("README's plan line");
    let edited: String = readme
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if i == n {
                format!("{l} --budget-accuracy 1\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    let (_, clean) = check_repo_doc(&spec, root, "README.md", &readme);
    let (_, bad) = check_repo_doc(&spec, root, "README.md", &edited);
    let new: Vec<_> = bad.iter().filter(|b| !clean.contains(b)).collect();
    assert_eq!(new.len(), 1, "{bad:#?}");
    assert!(
        new[0].starts_with(&format!(
            "README.md:{}: `--budget-accuracy` is not an option of `llama plan --help`",
            n + 1
        )),
        "{}",
        new[0]
    );
}

// ---------------------------------------------------------------------------------------
// The parser and the checker on scratch documents (no runner needed)

const SCRATCH: &str = r#"# Scratch

Run `llama plan --tp 4 --budget-acc 1` or, wrapped over two lines, `sweep --tps 8
--fractions "" --resume`. Not commands: `cargo bench --bench x -- --warm-up-time 1`,
`CARGO_TARGET_DIR=/t cargo test --release --test latency -- --ignored`; options only:
`--wire bf16`. Scripts: `demo.sh`, scripts/test.sh.

```sh
B="cargo run --release --example llama -- eval --tp 8 --limit 500"
E="$B --offset 80"
$E --out a.json \
   --paired-with b.json   # compare with `perplexity --lambada 5`
$B --spd layers:1 ...x.json;  $B --spd layers:2 --bogus ...y.json
python3 scripts/accuracy_table.py --paired a.json
for tp in 2 4; do
  cargo run --release --features cuda --example llama -- plan --tp $tp \
      --budget-ppl 10 --out plan_tp${tp}.json     # log \
done
cargo run --release --example llama -- --version
```

```rust
llama plan --not-shell
```
"#;

fn summary(p: &Parsed) -> Vec<(usize, bool, String)> {
    p.commands
        .iter()
        .map(|c| {
            let args = c.args.iter().map(|w| w.text.as_str()).collect::<Vec<_>>();
            (c.line, c.inline, args.join(" "))
        })
        .collect()
}

#[test]
fn parser_reads_code_blocks_continuations_variables_and_inline_spans() {
    let p = parse_doc(SCRATCH);
    let got = summary(&p);
    let want: Vec<(usize, bool, String)> = vec![
        (3, true, "plan --tp 4 --budget-acc 1".into()),
        (3, true, "sweep --tps 8 --fractions  --resume".into()),
        (12, true, "perplexity --lambada 5".into()),
        (
            11,
            false,
            "eval --tp 8 --limit 500 --offset 80 --out a.json --paired-with b.json".into(),
        ),
        (
            13,
            false,
            "eval --tp 8 --limit 500 --spd layers:1 ...x.json".into(),
        ),
        (
            13,
            false,
            "eval --tp 8 --limit 500 --spd layers:2 --bogus ...y.json".into(),
        ),
        (
            16,
            false,
            "plan --tp $tp --budget-ppl 10 --out plan_tp${tp}.json".into(),
        ),
        (19, false, "--version".into()),
    ];
    assert_eq!(got, want, "{got:#?}");
    // The flags of a continued line keep their own lines.
    let paired = p.commands[3]
        .args
        .iter()
        .find(|w| w.text == "--paired-with")
        .unwrap();
    assert_eq!(paired.line, 12);
    let resume = p.commands[1]
        .args
        .iter()
        .find(|w| w.text == "--resume")
        .unwrap();
    assert_eq!(resume.line, 4);
    let loose: Vec<_> = p
        .loose_flags
        .iter()
        .map(|w| (w.line, w.text.as_str()))
        .collect();
    assert_eq!(loose, vec![(6, "--wire")]);
    let mut scripts = p.scripts.clone();
    scripts.sort();
    assert_eq!(
        scripts,
        vec![
            (6, "scripts/demo.sh".to_string()),
            (6, "scripts/test.sh".to_string()),
            (14, "scripts/accuracy_table.py".to_string()),
        ]
    );
}

fn scratch_spec() -> CliSpec {
    let opts = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    let mut spec = CliSpec {
        top: opts(&["--help", "--version"]),
        ..Default::default()
    };
    spec.subs.insert(
        "plan".into(),
        opts(&["--tp", "--budget-acc", "--budget-ppl", "--out", "--help"]),
    );
    spec.subs.insert(
        "sweep".into(),
        opts(&["--tps", "--fractions", "--resume", "--help"]),
    );
    spec.subs.insert(
        "perplexity".into(),
        opts(&["--lambada", "--wire", "--help"]),
    );
    spec.subs.insert(
        "eval".into(),
        opts(&[
            "--tp",
            "--limit",
            "--offset",
            "--out",
            "--paired-with",
            "--spd",
            "--help",
        ]),
    );
    spec
}

#[test]
fn checker_reports_every_problem_with_its_file_and_line() {
    let spec = scratch_spec();
    let scripts = |p: &str| p != "scripts/demo.sh";
    let none = |_: &str| false;
    let bad = check(&spec, "SCRATCH.md", &parse_doc(SCRATCH), &none, &scripts);
    assert_eq!(
        bad,
        vec![
            "SCRATCH.md:13: `--bogus` is not an option of `llama eval --help` in `eval --tp 8 --limit 500 --spd layers:2 --bogus ...y.json`".to_string(),
            "SCRATCH.md:6: `scripts/demo.sh` does not exist".to_string(),
        ]
    );
    // A renamed option, a removed subcommand (after `llama` and bare), a top-level option and
    // a stale option list.
    let doc = "Use `llama plan --tp 4 --budget-accuracy 1`.\n\n\
               ```sh\ncargo run --release --example llama -- planner --tp 4\n\
               cargo run --release --example llama -- --tp 4 plan\n```\n\n\
               With `--fractionz 0.5`, `--features cuda` and `--stage1`; `planz --tp 2`.\n";
    let foreign = |f: &str| f == "--features" || f == "--stage1";
    let bad = check(&spec, "X.md", &parse_doc(doc), &foreign, &scripts);
    assert_eq!(bad.len(), 5, "{bad:#?}");
    assert!(
        bad[0].starts_with("X.md:1: `--budget-accuracy` is not an option of `llama plan --help`")
    );
    assert!(bad[1].starts_with("X.md:4: `llama planner`: no such subcommand"));
    assert!(bad[2].starts_with("X.md:5: `llama --tp`: not an option of `llama --help`"));
    assert!(bad[3].starts_with("X.md:8: `llama planz`: no such subcommand"));
    assert!(bad[3].ends_with("add it to OTHER_TOOLS)"), "{}", bad[3]);
    assert!(
        bad[4].starts_with("X.md:8: `--fractionz` (named in the text) is an option of no runner")
    );
    // `--features` and `--stage1` are another tool's: the real `foreign` knows cargo's options
    // and reads scripts/ (`--stage1` is scripts/gpu-check.sh's).
}

#[test]
fn help_texts_are_read_as_clap_writes_them() {
    let top = "Usage: llama <COMMAND>\n\nCommands:\n  generate     Generate text\n  plan         Choose\n                 a wrapped line\n  help         Print this\n\nOptions:\n  -h, --help     Print help\n  -V, --version  Print version\n";
    assert_eq!(commands_in_help(top), vec!["generate", "plan", "help"]);
    let opts = options_in_help(top);
    let want: BTreeSet<String> = ["-h", "--help", "-V", "--version"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(opts, want);
    let sub = "Options:\n      --tp <TP>          Tensor-parallel degree [default: 1]\n  -n, --max-tokens <MAX_TOKENS>  Tokens -- to generate\n      --chat             Wrap --prompt\n";
    let opts: Vec<String> = options_in_help(sub).into_iter().collect();
    assert_eq!(opts, vec!["--chat", "--max-tokens", "--tp", "-n"]);
}
