//! Corpus of log lines holding secrets in every form the masker must catch, with the exact masked
//! line expected and, independently of the masker's own code, a check that no form survives.

use std::borrow::Cow;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use davit_agent::masking::{MASK, Masker};

/// Every form of `secret` (and of each line of it) that must not survive masking, computed here
/// without the masker's code so a mistake there cannot hide itself.
fn forms_that_must_not_appear(secret: &str) -> Vec<String> {
    let mut fragments = vec![secret.to_owned()];
    fragments.extend(secret.split('\n').map(|line| line.trim_end_matches('\r').trim().to_owned()));
    let mut forms = Vec::new();
    for fragment in fragments.iter().filter(|fragment| fragment.trim().chars().count() >= 4) {
        let bytes = fragment.as_bytes();
        forms.push(fragment.clone());
        for engine in [&STANDARD, &URL_SAFE, &STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
            forms.push(engine.encode(bytes));
        }
        for leading_byte_count in 0..3 {
            let mut aligned = vec![b'x'; leading_byte_count];
            aligned.extend_from_slice(bytes);
            let encoded = STANDARD_NO_PAD.encode(&aligned);
            forms.push(encoded[(leading_byte_count * 8).div_ceil(6)..aligned.len() * 8 / 6].to_owned());
        }
        for space in ["%20", "+"] {
            let uppercase = percent_encode_unreserved(fragment, space);
            forms.push(lowercase_percent_hex(&uppercase));
            forms.push(uppercase);
        }
        let quoted = serde_json::to_string(fragment).expect("a string always serializes");
        forms.push(quoted[1..quoted.len() - 1].to_owned());
        forms.push(json_escape_ascii_only(fragment));
    }
    forms.retain(|form| form.chars().count() >= 4);
    forms
}

fn percent_encode_unreserved(text: &str, space: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => char::from(byte).to_string(),
            b' ' => space.to_owned(),
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// Lower-cases the two hex digits after each `%`, leaving the rest of the text as it is.
fn lowercase_percent_hex(text: &str) -> String {
    let mut lowered = String::with_capacity(text.len());
    let mut hex_digits_left = 0;
    for character in text.chars() {
        if hex_digits_left > 0 {
            lowered.push(character.to_ascii_lowercase());
            hex_digits_left -= 1;
        } else {
            hex_digits_left = if character == '%' { 2 } else { 0 };
            lowered.push(character);
        }
    }
    lowered
}

/// What Python's `json.dumps` writes inside the quotes (non-ASCII as `\uXXXX`).
fn json_escape_ascii_only(text: &str) -> String {
    let quoted = serde_json::to_string(text).expect("a string always serializes");
    let mut escaped = String::new();
    for character in quoted[1..quoted.len() - 1].chars() {
        if character.is_ascii() {
            escaped.push(character);
        } else {
            let mut units = [0_u16; 2];
            for unit in character.encode_utf16(&mut units) {
                escaped.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    escaped
}

/// Masks `line` with a masker for `secrets`, checks the exact result and that no form of any secret
/// is left in it.
fn assert_masks(secrets: &[&str], line: &str, expected: &str) {
    let masker = Masker::new(secrets);
    let masked = masker.mask(line);
    assert_eq!(masked, expected, "masking {line:?}");
    for secret in secrets {
        for form in forms_that_must_not_appear(secret) {
            assert!(!masked.contains(&form), "{form:?} (a form of a secret) survived in {masked:?}");
        }
    }
}

#[test]
fn raw_secret() {
    assert_masks(&["s3cr3t-T0ken!"], "login with s3cr3t-T0ken! now", "login with *** now");
    assert_masks(&["s3cr3t-T0ken!"], "s3cr3t-T0ken!", MASK);
    assert_masks(&["pässwörd"], "x pässwörd y", "x *** y");
}

#[test]
fn standard_base64_with_and_without_padding() {
    assert_masks(&["s3cr3t-T0ken!"], "echo czNjcjN0LVQwa2VuIQ== | base64 -d", "echo *** | base64 -d");
    assert_masks(&["s3cr3t-T0ken!"], "TOKEN_B64=czNjcjN0LVQwa2VuIQ;", "TOKEN_B64=***;");
}

#[test]
fn base64_of_a_secret_inside_a_longer_encoded_text_at_each_alignment() {
    // base64("ci:s3cr3t-T0ken!@registry"): the secret starts on a 3-byte boundary.
    assert_masks(
        &["s3cr3t-T0ken!"],
        "Authorization: Basic Y2k6czNjcjN0LVQwa2VuIUByZWdpc3RyeQ==",
        "Authorization: Basic Y2k6***UByZWdpc3RyeQ==",
    );
    // base64("bot:s3cr3t-T0ken!@registry"): one byte past a boundary.
    assert_masks(
        &["s3cr3t-T0ken!"],
        "Authorization: Basic Ym90OnMzY3IzdC1UMGtlbiFAcmVnaXN0cnk=",
        "Authorization: Basic Ym90On***FAcmVnaXN0cnk=",
    );
    // base64("user:s3cr3t-T0ken!@registry"): two bytes past a boundary.
    assert_masks(
        &["s3cr3t-T0ken!"],
        "Authorization: Basic dXNlcjpzM2NyM3QtVDBrZW4hQHJlZ2lzdHJ5",
        "Authorization: Basic dXNlcjp***QHJlZ2lzdHJ5",
    );
}

#[test]
fn base64url_without_padding() {
    // Standard base64 of this secret is fn4+Pj8/c2VjcmV0PDx+fg== so the URL-safe alphabet differs.
    assert_masks(&["~~>>??secret<<~~"], "GET /callback?state=fn4-Pj8_c2VjcmV0PDx-fg&x=1", "GET /callback?state=***&x=1");
    assert_masks(&["~~>>??secret<<~~"], "standard: fn4+Pj8/c2VjcmV0PDx+fg==", "standard: ***");
}

#[test]
fn url_encoded_with_both_spaces_and_both_hex_cases() {
    let secret = "p@ss word/with+plus&é";
    assert_masks(&[secret], "GET /login?pw=p%40ss%20word%2Fwith%2Bplus%26%C3%A9&next=1", "GET /login?pw=***&next=1");
    assert_masks(&[secret], "body: pw=p%40ss+word%2Fwith%2Bplus%26%C3%A9", "body: pw=***");
    assert_masks(&[secret], "GET /login?pw=p%40ss%20word%2fwith%2bplus%26%c3%a9", "GET /login?pw=***");
    assert_masks(&[secret], "body: pw=p%40ss+word%2fwith%2bplus%26%c3%a9", "body: pw=***");
    // Python's urllib.parse.quote keeps '/'.
    assert_masks(&[secret], "GET /p%40ss%20word/with%2Bplus%26%C3%A9", "GET /***");
    assert_masks(&[secret], "raw p@ss word/with+plus&é", "raw ***");
}

#[test]
fn json_escaped_with_quotes_backslashes_control_characters_and_unicode() {
    let secret = "he said \"hi\"\\path\ttab é😀";
    assert_masks(&[secret], r#"{"password":"he said \"hi\"\\path\ttab é😀"}"#, r#"{"password":"***"}"#);
    // Python's json.dumps writes non-ASCII as \uXXXX, with a surrogate pair outside the BMP.
    assert_masks(&[secret], r#"{"password": "he said \"hi\"\\path\ttab \u00e9\ud83d\ude00"}"#, r#"{"password": "***"}"#);
    // A newline inside the secret is written as \n, so the whole secret fits on one log line.
    assert_masks(&["first line\nsecond-line"], r#"{"key":"first line\nsecond-line","ok":true}"#, r#"{"key":"***","ok":true}"#);
}

#[test]
fn each_line_of_a_multi_line_secret() {
    let key = "-----BEGIN TEST KEY-----\r\nMIIBOgIBAAJBAKj34GkxFhD9\r\nxyz\r\n  QJq8wmJ5S2T0  \r\n-----END TEST KEY-----\r\n";
    assert_masks(&[key], "-----BEGIN TEST KEY-----", MASK);
    assert_masks(&[key], "MIIBOgIBAAJBAKj34GkxFhD9", MASK);
    assert_masks(&[key], "key line: MIIBOgIBAAJBAKj34GkxFhD9 (copied)", "key line: *** (copied)");
    assert_masks(&[key], "    QJq8wmJ5S2T0", "    ***");
    assert_masks(&[key], "-----END TEST KEY-----", MASK);
    // A line shorter than 4 characters is left alone, or every `xyz` in the log would go.
    assert_masks(&[key], "xyz", "xyz");
    // Lines split on a bare \n too.
    assert_masks(&["alpha-line\nbeta-line"], "got beta-line then alpha-line", "got *** then ***");
}

#[test]
fn fragments_shorter_than_four_characters_are_left_alone() {
    assert_masks(&["abc", "xy", "", "f00d"], "abc xy abcxy f00d", "abc xy abcxy ***");
    // The base64 of a short secret ("YWJj" for "abc") is not masked either.
    let masker = Masker::new(&["abc"]);
    assert!(matches!(masker.mask("YWJj abc"), Cow::Borrowed("YWJj abc")));
}

#[test]
fn overlapping_secrets_are_masked_fully() {
    assert_masks(&["abcdef12", "ef12ghij"], "xabcdef12ghijy", "x***y");
    assert_masks(&["ef12ghij", "abcdef12"], "xabcdef12ghijy", "x***y");
    assert_masks(&["token-1234", "token-12345678"], "a token-12345678 b token-1234 c", "a *** b *** c");
    assert_masks(&["token-12345678", "token-1234"], "a token-12345678 b token-1234 c", "a *** b *** c");
}

#[test]
fn a_secret_several_times_in_one_line() {
    assert_masks(&["hunter22"], "k=hunter22 v=hunter22 hunter22hunter22 end", "k=*** v=*** ****** end");
    assert_masks(&["hunter22"], "raw hunter22 b64 aHVudGVyMjI= again hunter22", "raw *** b64 *** again ***");
}

#[test]
fn lines_without_secrets_are_borrowed() {
    let no_secrets = Masker::new::<&str>(&[]);
    assert!(matches!(no_secrets.mask("compiling davit"), Cow::Borrowed("compiling davit")));
    let masker = Masker::new(&["s3cr3t-T0ken!"]);
    assert!(matches!(masker.mask("compiling davit"), Cow::Borrowed("compiling davit")));
}
