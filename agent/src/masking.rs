//! Masking of a job's secret values in its log lines, before a byte of the log leaves the host.
//! It owns the list of forms a secret can take in build output (raw, base64, percent-encoded,
//! JSON-escaped, one line of a multi-line value) and must never print, log or return a secret.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fmt;

use aho_corasick::{AhoCorasick, MatchKind};
use base64::Engine as _;
use base64::engine::GeneralPurpose;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};

/// What every masked stretch of a line is replaced with.
pub const MASK: &str = "***";

/// Forms (and secrets, and lines of multi-line secrets) shorter than this many characters are left
/// alone: masking every `abc` or `0` in a log would make it unreadable and hides nothing of worth.
pub const MINIMUM_MASKED_LENGTH: usize = 4;

/// Characters that common percent-encoders leave as they are, beside ASCII letters and digits. Each
/// encoder produces a different text for the same secret, so the masker looks for all of them.
const PERCENT_ENCODING_KEPT_CHARACTERS: [&[u8]; 4] = [
    // RFC 3986 unreserved characters: Python's quote_plus, Go's url.QueryEscape, Rust's urlencoding.
    b"-._~",
    // JavaScript's encodeURIComponent.
    b"-_.!~*'()",
    // The WHATWG application/x-www-form-urlencoded serializer (browsers, curl --data-urlencode).
    b"*-._",
    // Python's urllib.parse.quote, which keeps '/' by default.
    b"-._~/",
];

#[derive(Debug, thiserror::Error)]
pub enum MaskingError {
    #[error(
        "the job's secrets give {form_count} forms to mask, more than the masking automaton can hold ({source}); \
         split the secrets over several jobs or shorten them"
    )]
    TooManyForms {
        form_count: usize,
        #[source]
        source: aho_corasick::BuildError,
    },
}

/// Replaces every known form of a job's secrets in a log line with [`MASK`].
///
/// All forms are computed once in [`Masker::new`] and compiled into one Aho-Corasick automaton, so
/// masking a line costs one pass over it however many secrets the job has.
pub struct Masker {
    /// `None` when no secret is long enough to mask, so `mask` can hand lines back untouched.
    automaton: Option<AhoCorasick>,
}

// Written by hand so that a `{:?}` in a log or a panic message can never print a secret.
impl fmt::Debug for Masker {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.debug_struct("Masker").field("form_count", &self.form_count()).finish()
    }
}

impl Masker {
    /// Builds a masker for these secret values.
    ///
    /// # Panics
    ///
    /// Panics only when the secrets give more forms than an automaton can hold (billions of
    /// states, so gigabytes of secrets); use [`Masker::try_new`] to handle that as an error.
    pub fn new<S: AsRef<str>>(secrets: &[S]) -> Masker {
        match Masker::try_new(secrets) {
            Ok(masker) => masker,
            Err(error) => panic!("{error}"),
        }
    }

    pub fn try_new<S: AsRef<str>>(secrets: &[S]) -> Result<Masker, MaskingError> {
        let mut forms = BTreeSet::new();
        for secret in secrets {
            add_forms_of_secret(secret.as_ref(), &mut forms);
        }
        if forms.is_empty() {
            return Ok(Masker { automaton: None });
        }
        // Standard match semantics are what overlapping search needs: it reports every occurrence of
        // every form, so overlapping secrets are masked as the union of their matches.
        let automaton = AhoCorasick::builder()
            .match_kind(MatchKind::Standard)
            .build(&forms)
            .map_err(|source| MaskingError::TooManyForms { form_count: forms.len(), source })?;
        Ok(Masker { automaton: Some(automaton) })
    }

    /// How many distinct texts this masker looks for; zero when it masks nothing.
    pub fn form_count(&self) -> usize {
        self.automaton.as_ref().map_or(0, |automaton| automaton.patterns_len())
    }

    /// Returns the line with every occurrence of every form of every secret replaced by [`MASK`].
    ///
    /// Occurrences that overlap are merged and masked once, so neither `abcdef` nor `defghi` leaves a
    /// piece of itself behind in `abcdefghi`. A line with nothing to mask is returned borrowed.
    pub fn mask<'a>(&self, line: &'a str) -> Cow<'a, str> {
        let Some(automaton) = &self.automaton else {
            return Cow::Borrowed(line);
        };
        // An empty Vec does not allocate, so lines without secrets cost no allocation.
        let mut matched_ranges: Vec<(usize, usize)> = Vec::new();
        for found in automaton.find_overlapping_iter(line) {
            matched_ranges.push((found.start(), found.end()));
        }
        if matched_ranges.is_empty() {
            return Cow::Borrowed(line);
        }
        matched_ranges.sort_unstable();

        // Forms are valid UTF-8 and so is the line, so every match starts and ends on a character
        // boundary and the slicing below cannot split a character.
        let mut masked = String::with_capacity(line.len());
        let mut copied_up_to = 0;
        let (mut range_start, mut range_end) = matched_ranges[0];
        for &(start, end) in &matched_ranges[1..] {
            if start < range_end {
                range_end = range_end.max(end);
            } else {
                masked.push_str(&line[copied_up_to..range_start]);
                masked.push_str(MASK);
                copied_up_to = range_end;
                (range_start, range_end) = (start, end);
            }
        }
        masked.push_str(&line[copied_up_to..range_start]);
        masked.push_str(MASK);
        masked.push_str(&line[range_end..]);
        Cow::Owned(masked)
    }
}

/// Adds the forms of the whole secret and, because a log line never holds more than one line of a
/// multi-line secret (a PEM key, a kubeconfig), the forms of each of its lines.
fn add_forms_of_secret(secret: &str, forms: &mut BTreeSet<String>) {
    add_forms_of_fragment(secret, forms);
    for line in secret.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        // Trimmed as well, because tools re-indent what they print; the trimmed line is inside the
        // untrimmed one, so this masks at least as much.
        let trimmed_line = line.trim();
        if trimmed_line != secret {
            add_forms_of_fragment(trimmed_line, forms);
        }
    }
}

fn add_forms_of_fragment(fragment: &str, forms: &mut BTreeSet<String>) {
    if fragment.trim().chars().count() < MINIMUM_MASKED_LENGTH {
        return;
    }
    add_form(fragment.to_owned(), forms);
    add_base64_forms(fragment.as_bytes(), forms);
    add_percent_encoded_forms(fragment, forms);
    add_json_escaped_forms(fragment, forms);
}

fn add_form(form: String, forms: &mut BTreeSet<String>) {
    if form.chars().count() >= MINIMUM_MASKED_LENGTH {
        forms.insert(form);
    }
}

/// The secret on its own in standard and URL-safe base64, padded and unpadded, and the part of its
/// encoding that stays the same when it sits inside a longer encoded text (`user:secret` in a Basic
/// auth header, a secret inside a base64 kubeconfig).
fn add_base64_forms(bytes: &[u8], forms: &mut BTreeSet<String>) {
    for padded_engine in [&STANDARD, &URL_SAFE] {
        add_form(padded_engine.encode(bytes), forms);
    }
    for unpadded_engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
        add_form(unpadded_engine.encode(bytes), forms);
        for leading_byte_count in 0..3 {
            add_form(stable_base64_characters(unpadded_engine, bytes, leading_byte_count), forms);
        }
    }
}

/// Base64 encodes 3 bytes as 4 characters, so a secret that follows `leading_byte_count` (mod 3)
/// other bytes is encoded differently at each of the 3 alignments. At each alignment, the characters
/// whose 6 bits all come from the secret are the same whatever the surrounding bytes are; the one or
/// two characters at each end that mix in neighbouring bits are not, and are left out.
fn stable_base64_characters(engine: &GeneralPurpose, bytes: &[u8], leading_byte_count: usize) -> String {
    let mut aligned = vec![0_u8; leading_byte_count];
    aligned.extend_from_slice(bytes);
    let encoded = engine.encode(&aligned);
    let first_stable_character = (leading_byte_count * 8).div_ceil(6);
    let end_of_stable_characters = (aligned.len() * 8) / 6;
    if first_stable_character >= end_of_stable_characters {
        return String::new();
    }
    encoded[first_stable_character..end_of_stable_characters].to_owned()
}

fn add_percent_encoded_forms(fragment: &str, forms: &mut BTreeSet<String>) {
    for kept_characters in PERCENT_ENCODING_KEPT_CHARACTERS {
        for space_as_plus in [false, true] {
            for uppercase_hex in [true, false] {
                add_form(percent_encode(fragment, kept_characters, space_as_plus, uppercase_hex), forms);
            }
        }
    }
}

/// Percent-encodes every byte of `text` except ASCII letters, digits and `kept_characters`, writing
/// a space as `+` (form encoding) or `%20` (everything else).
fn percent_encode(text: &str, kept_characters: &[u8], space_as_plus: bool, uppercase_hex: bool) -> String {
    let hex_digits: &[u8; 16] = if uppercase_hex { b"0123456789ABCDEF" } else { b"0123456789abcdef" };
    let mut encoded = String::with_capacity(text.len() * 3);
    for &byte in text.as_bytes() {
        if byte.is_ascii_alphanumeric() || kept_characters.contains(&byte) {
            encoded.push(char::from(byte));
        } else if byte == b' ' && space_as_plus {
            encoded.push('+');
        } else {
            encoded.push('%');
            encoded.push(char::from(hex_digits[usize::from(byte >> 4)]));
            encoded.push(char::from(hex_digits[usize::from(byte & 0x0f)]));
        }
    }
    encoded
}

/// How a JSON encoder escapes text inside a string, beyond what every encoder escapes (`"`, `\` and
/// control characters).
#[derive(Debug, Clone, Copy)]
struct JsonEscaping {
    /// Everything outside ASCII as `\uXXXX` (Python's `json.dumps`, PHP's `json_encode`).
    non_ascii: bool,
    /// `<`, `>`, `&`, U+2028 and U+2029 as `\uXXXX` (Go's `encoding/json`).
    html_characters: bool,
    /// `/` as `\/` (PHP's `json_encode`).
    slash: bool,
}

fn add_json_escaped_forms(fragment: &str, forms: &mut BTreeSet<String>) {
    // serde_json's own output is the reference form; the others are what other languages' encoders
    // write for the same text, which is what a build step written in them prints.
    let quoted = serde_json::Value::String(fragment.to_owned()).to_string();
    add_form(quoted[1..quoted.len() - 1].to_owned(), forms);
    let other_encoders = [
        JsonEscaping { non_ascii: true, html_characters: false, slash: false },
        JsonEscaping { non_ascii: false, html_characters: true, slash: false },
        JsonEscaping { non_ascii: true, html_characters: false, slash: true },
    ];
    for escaping in other_encoders {
        add_form(json_escape(fragment, escaping), forms);
    }
}

/// Escapes `text` for the inside of a JSON string (without the quotes), in lower-case hex as Python,
/// Go, PHP and serde_json all write it.
fn json_escape(text: &str, escaping: JsonEscaping) -> String {
    use std::fmt::Write as _;

    let mut escaped = String::with_capacity(text.len() + 2);
    for character in text.chars() {
        match character {
            '"' => escaped.push_str("\\\""),
            '\\' => escaped.push_str("\\\\"),
            '\n' => escaped.push_str("\\n"),
            '\r' => escaped.push_str("\\r"),
            '\t' => escaped.push_str("\\t"),
            '\u{08}' => escaped.push_str("\\b"),
            '\u{0c}' => escaped.push_str("\\f"),
            '/' if escaping.slash => escaped.push_str("\\/"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' if escaping.html_characters => {
                let _ = write!(escaped, "\\u{:04x}", u32::from(character));
            }
            character if u32::from(character) < 0x20 || (escaping.non_ascii && !character.is_ascii()) => {
                // Characters outside the Basic Multilingual Plane are written as a UTF-16 surrogate pair.
                let mut utf16_units = [0_u16; 2];
                for unit in character.encode_utf16(&mut utf16_units) {
                    let _ = write!(escaped, "\\u{unit:04x}");
                }
            }
            character => escaped.push(character),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forms_of(secret: &str) -> BTreeSet<String> {
        let mut forms = BTreeSet::new();
        add_forms_of_secret(secret, &mut forms);
        forms
    }

    #[test]
    fn empty_secret_list_returns_the_line_borrowed() {
        let masker = Masker::new::<&str>(&[]);
        assert_eq!(masker.form_count(), 0);
        assert!(matches!(masker.mask("nothing to hide"), Cow::Borrowed("nothing to hide")));
    }

    #[test]
    fn line_without_secret_is_returned_borrowed() {
        let masker = Masker::new(&["hunter22"]);
        assert!(matches!(masker.mask("compiling 3 crates"), Cow::Borrowed(_)));
    }

    #[test]
    fn secrets_shorter_than_the_minimum_give_no_form() {
        assert!(forms_of("abc").is_empty());
        assert!(forms_of("  ab  ").is_empty());
        assert!(forms_of("").is_empty());
        assert!(Masker::new(&["abc", "", "x"]).form_count() == 0);
    }

    #[test]
    fn every_form_is_at_least_the_minimum_length() {
        for secret in ["abcd", "a b\nc\"d\u{e9}", "p@ss w0rd/é", "line one\r\nline two"] {
            for form in forms_of(secret) {
                assert!(form.chars().count() >= MINIMUM_MASKED_LENGTH, "{form:?}");
            }
        }
    }

    #[test]
    fn stable_base64_characters_match_the_encoding_with_real_neighbours() {
        let secret = b"correct horse battery";
        for prefix in [&b""[..], b"u", b"us", b"use", b"user:"] {
            let mut whole = prefix.to_vec();
            whole.extend_from_slice(secret);
            whole.extend_from_slice(b"@host");
            let encoded = STANDARD.encode(&whole);
            let stable = stable_base64_characters(&STANDARD_NO_PAD, secret, prefix.len() % 3);
            assert!(stable.len() >= secret.len() * 4 / 3 - 2, "{stable}");
            assert!(encoded.contains(&stable), "{encoded} does not contain {stable}");
        }
    }

    #[test]
    fn percent_encoding_follows_the_chosen_conventions() {
        assert_eq!(percent_encode("a b/é", b"-._~", false, true), "a%20b%2F%C3%A9");
        assert_eq!(percent_encode("a b/é", b"-._~", true, false), "a+b%2f%c3%a9");
        assert_eq!(percent_encode("a b/é", b"-._~/", false, true), "a%20b/%C3%A9");
    }

    #[test]
    fn json_escaping_matches_serde_json_when_nothing_extra_is_escaped() {
        let plain = JsonEscaping { non_ascii: false, html_characters: false, slash: false };
        let text = "quote\" backslash\\ newline\n tab\t bell\u{7} del\u{7f} é 😀 </a>";
        let quoted = serde_json::to_string(text).expect("a string always serializes");
        assert_eq!(json_escape(text, plain), quoted[1..quoted.len() - 1]);
    }

    #[test]
    fn json_escaping_of_other_encoders() {
        let python = JsonEscaping { non_ascii: true, html_characters: false, slash: false };
        let go = JsonEscaping { non_ascii: false, html_characters: true, slash: false };
        let php = JsonEscaping { non_ascii: true, html_characters: false, slash: true };
        assert_eq!(json_escape("é😀<", python), "\\u00e9\\ud83d\\ude00<");
        assert_eq!(json_escape("é<&>", go), "é\\u003c\\u0026\\u003e");
        assert_eq!(json_escape("a/é", php), "a\\/\\u00e9");
    }

    #[test]
    fn debug_output_never_shows_a_secret() {
        let masker = Masker::new(&["hunter22-very-secret"]);
        let printed = format!("{masker:?}");
        assert!(!printed.contains("hunter22"), "{printed}");
        assert!(printed.starts_with("Masker { form_count: "), "{printed}");
    }

    #[test]
    fn overlapping_and_repeated_matches_are_merged() {
        let masker = Masker::new(&["aaaa"]);
        assert_eq!(masker.mask("xaaaaaay"), "x***y");
        assert_eq!(masker.mask("aaaa aaaa"), "*** ***");
    }
}
