//! Log levels detected from the text of one build-output line, the way a CI system shows them.
//! It owns the recognition of what compilers, build tools, package managers and loggers print to
//! mark errors and warnings; it never reads a level from a word inside another word (`errors=0`).

use std::borrow::Cow;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    Debug,
    Info,
    Warning,
    Error,
}

/// How many prefix tokens (timestamps, `[thread]` tags, file locations, tool names) are skipped while
/// looking for a level at the start of a line: enough for the usual logger layouts, few enough that a
/// word deep inside a sentence is never taken for a level.
const MAX_PREFIX_TOKENS: usize = 8;

/// How many whitespace-separated tokens are searched for an upper-case `ERROR` or `WARN` when the
/// line does not start with a level (`2024-01-02 03:04:05,123 - app - ERROR - boom`).
const UPPERCASE_LEVEL_SEARCH_TOKENS: usize = 8;

/// Texts that mean an error wherever they are in the line, in the case the tools print them.
const ERROR_MARKERS: [&str; 5] = [
    // Rust: `thread 'main' panicked at src/main.rs:2:5:`.
    "panicked at",
    // Python's uncaught exception.
    "Traceback (most recent call last)",
    // The JVM's uncaught exception: `Exception in thread "main" java.lang.IllegalStateException`.
    "Exception in thread ",
    // Maven prints its failure after an `[INFO]` prefix.
    "BUILD FAILURE",
    "npm ERR!",
];

struct LevelWord {
    word: &'static str,
    level: Level,
    /// Whether `Error something` (not only `ERROR something` or `error:`) counts: true for words a
    /// line rarely starts with unless it reports that level (yarn prints `error Command failed`),
    /// false for words that also open ordinary sentences (`Debug build of ...`, `Trace id ...`).
    counts_before_a_space_in_any_case: bool,
}

/// Level words, matched as whole words without regard to case.
const LEVEL_WORDS: [LevelWord; 13] = [
    LevelWord { word: "error", level: Level::Error, counts_before_a_space_in_any_case: true },
    LevelWord { word: "fatal", level: Level::Error, counts_before_a_space_in_any_case: true },
    LevelWord { word: "err", level: Level::Error, counts_before_a_space_in_any_case: false },
    LevelWord { word: "panic", level: Level::Error, counts_before_a_space_in_any_case: false },
    LevelWord { word: "critical", level: Level::Error, counts_before_a_space_in_any_case: false },
    LevelWord { word: "severe", level: Level::Error, counts_before_a_space_in_any_case: false },
    LevelWord { word: "warning", level: Level::Warning, counts_before_a_space_in_any_case: true },
    LevelWord { word: "warn", level: Level::Warning, counts_before_a_space_in_any_case: true },
    LevelWord { word: "debug", level: Level::Debug, counts_before_a_space_in_any_case: false },
    LevelWord { word: "trace", level: Level::Debug, counts_before_a_space_in_any_case: false },
    LevelWord { word: "info", level: Level::Info, counts_before_a_space_in_any_case: false },
    LevelWord { word: "notice", level: Level::Info, counts_before_a_space_in_any_case: false },
    LevelWord { word: "note", level: Level::Info, counts_before_a_space_in_any_case: false },
];

/// Tools that print their name before the level: `npm ERR!`, `npm warn deprecated`, `yarn error`.
const TOOL_NAMES_BEFORE_LEVEL: [&str; 3] = ["npm", "yarn", "pnpm"];

/// Detects the level of one line of build output; a line with no sign of a level is `Info`.
///
/// A level stated at the start of the line (after timestamps, tags and locations) wins; an `Info`
/// line can still be an error through a clear marker such as `BUILD FAILURE` or `panicked at`.
pub fn detect_level(line: &str) -> Level {
    let without_escapes = strip_terminal_escapes(line);
    let text = last_redrawn_segment(&without_escapes).trim_start();
    let level_at_start = level_at_start(text);
    if let Some(level @ (Level::Error | Level::Warning | Level::Debug)) = level_at_start {
        return level;
    }
    if has_error_marker(text) {
        return Level::Error;
    }
    if let Some(level) = level_at_start {
        return level;
    }
    if let Some(level) = uppercase_level_word_near_start(text) {
        return level;
    }
    structured_level_field(text).unwrap_or(Level::Info)
}

/// Removes colour and cursor escape sequences, which cargo, npm and most test runners print on a
/// terminal and which would otherwise hide `error` behind `\x1b[91m`.
fn strip_terminal_escapes(line: &str) -> Cow<'_, str> {
    if !line.contains('\u{1b}') {
        return Cow::Borrowed(line);
    }
    let mut plain = String::with_capacity(line.len());
    let mut characters = line.chars();
    while let Some(character) = characters.next() {
        if character != '\u{1b}' {
            plain.push(character);
            continue;
        }
        match characters.next() {
            // Control sequence: `ESC [`, parameter and intermediate bytes, then one final byte.
            Some('[') => {
                for sequence_character in characters.by_ref() {
                    if ('\u{40}'..='\u{7e}').contains(&sequence_character) {
                        break;
                    }
                }
            }
            // Operating system command (window title, hyperlink): ends with BEL or `ESC \`.
            Some(']') => {
                while let Some(sequence_character) = characters.next() {
                    if sequence_character == '\u{07}' {
                        break;
                    }
                    if sequence_character == '\u{1b}' {
                        characters.next();
                        break;
                    }
                }
            }
            // Any other escape is two characters long.
            _ => {}
        }
    }
    Cow::Owned(plain)
}

/// Progress bars redraw a line with `\r`; what a terminal shows is the last non-blank part.
fn last_redrawn_segment(line: &str) -> &str {
    line.rsplit('\r').find(|segment| !segment.trim().is_empty()).unwrap_or("")
}

/// The level stated at the start of the line, after any prefix a logger or tool puts first.
fn level_at_start(text: &str) -> Option<Level> {
    let mut rest = text.trim_start();
    for _ in 0..MAX_PREFIX_TOKENS {
        if rest.is_empty() {
            return None;
        }
        // GitHub Actions' log commands: `##[error]message` and `::warning file=a.js,line=1::message`.
        if rest.starts_with("##[") {
            rest = &rest[2..];
        }
        if let Some(command) = rest.strip_prefix("::") {
            return level_named(leading_word(command));
        }
        if let Some(after_bracket) = rest.strip_prefix('[') {
            let closing_bracket = after_bracket.find(']')?;
            let content = after_bracket[..closing_bracket].trim();
            // `[main/ERROR]` and `[12:00:00 WARN]` put the level last inside the brackets.
            let last_part = content.rsplit(['/', ' ']).next().unwrap_or(content);
            if let Some(level) = level_named(last_part) {
                return Some(level);
            }
            rest = after_bracket[closing_bracket + 1..].trim_start();
            continue;
        }
        if let Some(after_caused_by) = rest.strip_prefix("Caused by:") {
            rest = after_caused_by.trim_start();
            continue;
        }

        let word = leading_word(rest);
        if let Some(level) = level_of_word(word, rest[word.len()..].chars().next()) {
            return Some(level);
        }
        if let Some(level) = exception_level(rest) {
            return Some(level);
        }
        let token_length = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let (token, after_token) = (&rest[..token_length], rest[token_length..].trim_start());
        if !is_prefix_token(token, after_token) {
            return None;
        }
        rest = after_token;
    }
    None
}

/// Whether `token` is something tools print before the level rather than part of the message.
fn is_prefix_token(token: &str, after_token: &str) -> bool {
    is_timestamp(token)
        || is_build_step(token)
        || is_source_location(token)
        || is_tool_label(token)
        || TOOL_NAMES_BEFORE_LEVEL.contains(&token)
        // Decorations: `│ Error:` (terraform), `--- FAIL:` (go test), `= note:` (rustc), `> Task`.
        || token.chars().all(|character| !character.is_alphanumeric())
        // A service name in `docker compose` output: `web-1  | ERROR ...`.
        || after_token.starts_with('|')
}

/// `2024-01-02T03:04:05.123Z`, `2024/01/02`, `03:04:05,123`, `0.123` (docker buildkit's seconds).
fn is_timestamp(token: &str) -> bool {
    token.starts_with(|character: char| character.is_ascii_digit())
        && token.chars().all(|character| character.is_ascii_digit() || "-:./,TZ+".contains(character))
        && token.contains(['-', ':', '/', '.'])
}

/// Docker buildkit's step number: `#12`.
fn is_build_step(token: &str) -> bool {
    token.strip_prefix('#').is_some_and(|number| !number.is_empty() && number.bytes().all(|byte| byte.is_ascii_digit()))
}

/// `main.c:3:5:` (gcc, clang, go vet), `src/app.ts(3,7):` (tsc), `/app/x.py:3:` (Python warnings).
fn is_source_location(token: &str) -> bool {
    token.ends_with(':') && token.as_bytes().windows(2).any(|pair| matches!(pair[0], b':' | b'(') && pair[1].is_ascii_digit())
}

/// A lower-case tool name and a colon, which apt's helpers and git print before a level:
/// `dpkg: error processing package foo`.
fn is_tool_label(token: &str) -> bool {
    token.strip_suffix(':').is_some_and(|name| {
        !name.is_empty() && name.bytes().all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || matches!(byte, b'-' | b'_'))
    })
}

fn leading_word(text: &str) -> &str {
    &text[..text.find(|character: char| !character.is_ascii_alphanumeric()).unwrap_or(text.len())]
}

/// The level a word names, in any case; for places where the word is already marked as a level
/// (inside `[...]`, after `level=`).
fn level_named(word: &str) -> Option<Level> {
    LEVEL_WORDS.iter().find(|entry| entry.word.eq_ignore_ascii_case(word)).map(|entry| entry.level)
}

/// The level that `word` states when it opens a line and is followed by `next_character`.
fn level_of_word(word: &str, next_character: Option<char>) -> Option<Level> {
    let ends_a_marker = matches!(next_character, None | Some(':' | '.' | '!')) || next_character.is_some_and(char::is_whitespace);
    // Markers that count only in the exact case tools print them, because in other cases they are
    // ordinary words or letters.
    match word {
        // apt: `E: Unable to locate package`, `W: GPG error`, `N: Skipping acquire`.
        "E" if next_character == Some(':') => return Some(Level::Error),
        "W" if next_character == Some(':') => return Some(Level::Warning),
        "N" if next_character == Some(':') => return Some(Level::Info),
        // go test's `FAIL`, pytest's `FAILED tests/...`, gradle's `FAILURE: Build failed`.
        "FAIL" | "FAILED" | "FAILURE" if ends_a_marker => return Some(Level::Error),
        _ => {}
    }
    let entry = LEVEL_WORDS.iter().find(|entry| entry.word.eq_ignore_ascii_case(word))?;
    let strongly_marked = matches!(next_character, None | Some(':' | '[' | ']' | '!' | '|'));
    let followed_by_space = next_character.is_some_and(char::is_whitespace);
    let uppercase = word.bytes().all(|byte| byte.is_ascii_uppercase());
    (strongly_marked || (followed_by_space && (uppercase || entry.counts_before_a_space_in_any_case))).then_some(entry.level)
}

/// An exception's class name opening the line, which is how Python and the JVM end the report of
/// an uncaught exception: `ValueError: ...`, `java.lang.OutOfMemoryError: Java heap space`.
/// Python's warnings are reported the same way: `DeprecationWarning: ...`.
fn exception_level(text: &str) -> Option<Level> {
    let name_length =
        text.find(|character: char| !(character.is_ascii_alphanumeric() || matches!(character, '_' | '.' | '$'))).unwrap_or(text.len());
    let name = &text[..name_length];
    if !matches!(text[name_length..].chars().next(), None | Some(':')) {
        return None;
    }
    let class_name = name.rsplit('.').next().unwrap_or(name);
    if !class_name.starts_with(|character: char| character.is_ascii_uppercase()) {
        return None;
    }
    // The bare words `Error` and `Warning` are level words, handled (with their case rules) elsewhere.
    if class_name.ends_with("Exception") || (class_name.ends_with("Error") && class_name != "Error") {
        Some(Level::Error)
    } else if class_name.ends_with("Warning") && class_name != "Warning" {
        Some(Level::Warning)
    } else {
        None
    }
}

fn has_error_marker(text: &str) -> bool {
    ERROR_MARKERS.iter().any(|marker| text.contains(marker)) || contains_whole_word(text, "FAILED")
}

/// Whether `word` appears on its own, not inside `FAILED_TESTS` or as the key of `FAILED=0`.
fn contains_whole_word(text: &str, word: &str) -> bool {
    let is_word_byte = |byte: u8| byte.is_ascii_alphanumeric() || byte == b'_';
    text.match_indices(word).any(|(start, _)| {
        let before = text[..start].bytes().next_back();
        let after = text[start + word.len()..].bytes().next();
        !before.is_some_and(is_word_byte) && !after.is_some_and(|byte| is_word_byte(byte) || byte == b'=')
    })
}

/// An upper-case `ERROR`, `WARN` (and the like) as a whole token among the first few, which is how
/// many logger layouts put the level after a name or a thread. Only errors and warnings are found
/// this way: `Build type: DEBUG` must not hide a line from a reader who filters out debug lines.
fn uppercase_level_word_near_start(text: &str) -> Option<Level> {
    text.split_whitespace().take(UPPERCASE_LEVEL_SEARCH_TOKENS).find_map(|token| {
        let word = token.trim_matches(|character| matches!(character, '[' | ']' | '(' | ')' | '<' | '>' | ':' | '|' | '-' | ','));
        if !word.bytes().all(|byte| byte.is_ascii_uppercase()) {
            return None;
        }
        level_named(word).filter(|level| matches!(level, Level::Error | Level::Warning))
    })
}

/// The level field of a structured log line: logfmt's `level=warn` or `lvl=error` (Go's logrus,
/// Docker, Terraform) and JSON's `"level":"error"`.
fn structured_level_field(text: &str) -> Option<Level> {
    for key in ["level=", "lvl=", "\"level\":"] {
        for (index, _) in text.match_indices(key) {
            // `loglevel=debug` is some other setting being printed, not this line's level.
            let starts_a_field = key.starts_with('"') || text[..index].chars().next_back().is_none_or(char::is_whitespace);
            if !starts_a_field {
                continue;
            }
            let value = text[index + key.len()..].trim_start().trim_start_matches('"');
            if let Some(level) = level_named(leading_word(value)) {
                return Some(level);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as the tools print them, with the level a CI log viewer should show.
    const CASES: &[(&str, Level)] = &[
        // cargo and rustc
        ("   Compiling davit-agent v0.1.0 (/work/main/agent)", Level::Info),
        ("warning: unused variable: `lease_expires_at`", Level::Warning),
        ("warning: `davit-agent` (lib) generated 2 warnings", Level::Warning),
        ("error[E0308]: mismatched types", Level::Error),
        ("error: could not compile `davit-agent` (lib) due to 1 previous error", Level::Error),
        ("  --> agent/src/masking.rs:12:5", Level::Info),
        ("   = note: `#[warn(unused_variables)]` on by default", Level::Info),
        ("\u{1b}[0m\u{1b}[1m\u{1b}[91merror\u{1b}[0m\u{1b}[1m: cannot find value `x` in this scope\u{1b}[0m", Level::Error),
        ("\u{1b}[1m\u{1b}[33mwarning\u{1b}[0m: unused import", Level::Warning),
        ("    Finished `test` profile [unoptimized + debuginfo] target(s) in 0.52s", Level::Info),
        ("test masking::tests::masks_raw_secret ... ok", Level::Info),
        ("test masking::tests::masks_base64 ... FAILED", Level::Error),
        ("test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s", Level::Info),
        ("test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out", Level::Error),
        ("thread 'masking::tests::masks_base64' panicked at agent/src/masking.rs:40:9:", Level::Error),
        ("error: test failed, to rerun pass `-p davit-agent --lib`", Level::Error),
        // maven and gradle
        ("[INFO] Scanning for projects...", Level::Info),
        ("[INFO] Compiling 4 source files with javac [debug target 17] to target/classes", Level::Info),
        ("[WARNING] Using platform encoding (UTF-8 actually) to copy filtered resources", Level::Warning),
        ("[ERROR] Failed to execute goal org.apache.maven.plugins:maven-compiler-plugin:3.11.0:compile", Level::Error),
        ("[INFO] Tests run: 12, Failures: 0, Errors: 0, Skipped: 0, Time elapsed: 0.31 s", Level::Info),
        ("[ERROR] Tests run: 12, Failures: 1, Errors: 0, Skipped: 0, Time elapsed: 0.31 s <<< FAILURE!", Level::Error),
        ("[INFO] BUILD SUCCESS", Level::Info),
        ("[INFO] BUILD FAILURE", Level::Error),
        ("[DEBUG] Configuring mojo org.apache.maven.plugins:maven-surefire-plugin:3.2.2:test", Level::Debug),
        ("[INFO] ErrorProne plugin enabled for 4 sources", Level::Info),
        ("> Task :app:compileJava", Level::Info),
        ("> Task :app:test FAILED", Level::Error),
        ("FAILURE: Build failed with an exception.", Level::Error),
        ("BUILD SUCCESSFUL in 12s", Level::Info),
        ("BUILD FAILED in 3s", Level::Error),
        ("Exception in thread \"main\" java.lang.IllegalStateException: lease expired", Level::Error),
        ("\tat com.example.Lease.renew(Lease.java:42)", Level::Info),
        ("Caused by: java.io.IOException: connection reset", Level::Error),
        ("SEVERE: Servlet.service() for servlet [dispatcher] threw exception", Level::Error),
        // npm, yarn, node, webpack
        ("npm ERR! code ELIFECYCLE", Level::Error),
        ("npm ERR! errno 1", Level::Error),
        ("npm WARN deprecated request@2.88.2: request has been deprecated", Level::Warning),
        ("npm error code E404", Level::Error),
        ("npm warn deprecated inflight@1.0.6: This module is not supported", Level::Warning),
        ("npm notice New major version of npm available! 9.8.1 -> 10.2.4", Level::Info),
        ("added 120 packages, and audited 121 packages in 3s", Level::Info),
        ("found 0 vulnerabilities", Level::Info),
        ("error Command failed with exit code 1.", Level::Error),
        ("warning package.json: No license field", Level::Warning),
        ("Error: Cannot find module 'express'", Level::Error),
        ("ERROR in ./src/index.js 3:0-20", Level::Error),
        ("WARNING in asset size limit: The following asset(s) exceed the recommended size limit (244 KiB).", Level::Warning),
        ("src/index.ts(3,7): error TS2322: Type 'string' is not assignable to type 'number'.", Level::Error),
        // python and pip
        ("Traceback (most recent call last):", Level::Error),
        ("  File \"/app/deploy.py\", line 3, in <module>", Level::Info),
        ("ValueError: invalid literal for int() with base 10: 'x'", Level::Error),
        ("ERROR:root:deployment failed", Level::Error),
        ("WARNING:root:retrying upload", Level::Warning),
        ("DEBUG:urllib3.connectionpool:Starting new HTTPS connection (1): pypi.org:443", Level::Debug),
        ("2024-01-02 03:04:05,123 - deployer - ERROR - rollout aborted", Level::Error),
        ("2024-01-02 03:04:05,123 INFO uploading artifact", Level::Info),
        ("/app/deploy.py:3: DeprecationWarning: datetime.utcnow() is deprecated", Level::Warning),
        ("ERROR: Could not find a version that satisfies the requirement davit==9.9", Level::Error),
        ("WARNING: Running pip as the 'root' user can result in broken permissions", Level::Warning),
        ("Successfully installed requests-2.31.0 urllib3-2.1.0", Level::Info),
        ("FAILED tests/test_deploy.py::test_rollback - assert 2 == 3", Level::Error),
        ("========================= 1 failed, 4 passed in 0.12s =========================", Level::Info),
        // go
        ("go: downloading github.com/stretchr/testify v1.8.4", Level::Info),
        ("=== RUN   TestPlanRollout", Level::Info),
        ("--- PASS: TestPlanRollout (0.00s)", Level::Info),
        ("--- FAIL: TestPlanCanary (0.00s)", Level::Error),
        ("FAIL\tgithub.com/acme/deployer\t0.012s", Level::Error),
        ("ok  \tgithub.com/acme/deployer\t0.010s", Level::Info),
        ("panic: runtime error: index out of range [3] with length 3", Level::Error),
        ("goroutine 1 [running]:", Level::Info),
        ("fatal error: all goroutines are asleep - deadlock!", Level::Error),
        ("./main.go:5:2: undefined: planRollout", Level::Info),
        ("2024/01/02 15:04:05 listening on :8080", Level::Info),
        ("time=\"2024-01-02T03:04:05Z\" level=warning msg=\"slow request\"", Level::Warning),
        ("level=error ts=2024-01-02T03:04:05Z msg=\"upload failed\"", Level::Error),
        ("{\"level\":\"error\",\"msg\":\"upload failed\"}", Level::Error),
        ("loglevel=debug applied", Level::Info),
        // apt and dpkg
        ("Get:1 http://deb.debian.org/debian bookworm InRelease [151 kB]", Level::Info),
        ("Err:2 http://deb.debian.org/debian bookworm-updates InRelease", Level::Error),
        ("Reading package lists... Done", Level::Info),
        ("E: Unable to locate package davit-nonexistent", Level::Error),
        ("W: GPG error: http://example.com stable InRelease: The following signatures couldn't be verified", Level::Warning),
        ("N: Skipping acquire of configured file 'main/binary-i386/Packages'", Level::Info),
        ("debconf: delaying package configuration, since apt-utils is not installed", Level::Info),
        ("dpkg: error processing package davit (--configure):", Level::Error),
        ("Setting up curl (7.88.1-10+deb12u5) ...", Level::Info),
        // compilers, docker, terraform, CI runners, loggers
        ("main.c:5:3: warning: implicit declaration of function 'foo'", Level::Warning),
        ("main.c:1:10: fatal error: foo.h: No such file or directory", Level::Error),
        ("#8 ERROR: process \"/bin/sh -c make\" did not complete successfully: exit code: 2", Level::Error),
        ("#8 0.512 error: linker `cc` not found", Level::Error),
        ("#5 [2/4] RUN apt-get update", Level::Info),
        ("Error response from daemon: pull access denied for davit", Level::Error),
        ("│ Error: Invalid reference", Level::Error),
        ("##[error]Process completed with exit code 1.", Level::Error),
        ("##[group]Run cargo test", Level::Info),
        ("::warning file=app.js,line=1::Missing semicolon", Level::Warning),
        ("web-1  | 2024-01-02T03:04:05Z WARN server: slow request", Level::Warning),
        ("2024-01-02T03:04:05.123Z ERROR davit_agent::executor: job 12 failed", Level::Error),
        ("2024-01-02T03:04:05.123Z DEBUG davit_agent::executor: polling", Level::Debug),
        ("2024-01-02T03:04:05.123Z TRACE davit_agent::executor: tick", Level::Debug),
        ("12:00:01.250 [main] WARN  c.e.Deployer - canary slow", Level::Warning),
        ("[12:00:01] [Server thread/ERROR]: crashed", Level::Error),
        ("[debug] resolving dependencies", Level::Debug),
        ("downloading 50%\rdownloading 100%\rerror: checksum mismatch", Level::Error),
        ("progress 100%\r", Level::Info),
        // words that only contain a level word, or counts of errors
        ("errors=0 warnings=0", Level::Info),
        ("Found 0 errors and 0 warnings.", Level::Info),
        ("0 errors", Level::Info),
        ("error_count: 0", Level::Info),
        ("the terror of debugging", Level::Info),
        ("ErrorProne: 0 findings", Level::Info),
        ("Debug build of davit finished", Level::Info),
        ("Build type: DEBUG", Level::Info),
        ("Trace id 4bf92f3577b34da6", Level::Info),
        ("FAILED_TESTS=0", Level::Info),
        ("", Level::Info),
    ];

    #[test]
    fn detects_the_level_of_real_tool_output() {
        let mut failures = Vec::new();
        for &(line, expected) in CASES {
            let detected = detect_level(line);
            if detected != expected {
                failures.push(format!("{line:?}: expected {expected:?}, detected {detected:?}"));
            }
        }
        assert!(failures.is_empty(), "wrong levels:\n{}", failures.join("\n"));
    }

    #[test]
    fn strips_colour_and_hyperlink_escapes() {
        assert_eq!(strip_terminal_escapes("\u{1b}[1;31mred\u{1b}[0m plain"), "red plain");
        assert_eq!(strip_terminal_escapes("\u{1b}]8;;https://example.com\u{7}link\u{1b}]8;;\u{1b}\\ done"), "link done");
        assert!(matches!(strip_terminal_escapes("no escapes"), Cow::Borrowed(_)));
    }

    #[test]
    fn whole_word_search_ignores_longer_words_and_keys() {
        assert!(contains_whole_word("test foo ... FAILED", "FAILED"));
        assert!(contains_whole_word("test result: FAILED. 1 passed", "FAILED"));
        assert!(!contains_whole_word("UNFAILED FAILEDX FAILED_TESTS FAILED=0", "FAILED"));
    }
}
