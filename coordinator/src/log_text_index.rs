//! A per-segment index of the text of a log segment's messages, stored at the start of the
//! segment's blob, so that a text search skips segments that cannot hold its text after reading
//! a few kilobytes instead of fetching and decompressing the whole segment. It must never rule
//! out a segment that holds the text (no false negatives); letting through a segment that does
//! not is only a cost.
//!
//! The index is a Bloom filter (one hash) of byte trigrams of the messages lower-cased with
//! `str::to_lowercase`, the same lower-casing the search applies to messages and to the text
//! (`message.to_lowercase().contains(text.to_lowercase())`), so every trigram of a lower-cased
//! text found in a message is a trigram of the lower-cased message. The messages are indexed
//! one after the other, each followed by a newline, and only the trigrams starting at every
//! [`STRIDE`]-th byte of that go in: wherever a text sits, the trigrams at the text's offsets of
//! one residue modulo the stride are all in the filter, so a segment passes when, for some
//! residue, all of those are in it. A text of fewer than `2 + STRIDE` (four) bytes, lower-cased,
//! rules nothing out. A match never spans two messages; the trigrams across the end of one
//! message and the start of the next are in the filter too, which only lets a few more
//! segments through.
//!
//! Filter layout (format 1): a bit array of 64-bit words, a power of two of them, from 1 to
//! [`MAX_WORDS`] (8 KiB); each trigram sets one bit, chosen by its hash. The filter is built at
//! the largest size and then halved (the upper half OR-ed onto the lower, which keeps every bit
//! a trigram set, since a trigram's word is its hash modulo the word count) while the halved
//! filter has at most an eighth of its bits set, so a small segment gets a small index.
//!
//! Why one bit per trigram and a trigram every second byte, not the three bits a filter of
//! this size would best use at every byte: building the index goes through every byte of every
//! agent chunk. With three bits at every byte it took 16% of the coordinator's CPU in the
//! log-ingest benchmark, more than zstd (14%); with one bit, 8%, and ingest was still 12-20%
//! slower than without an index. The false-positive rate per trigram of the text that the
//! segment does not hold is the share of bits set: at most 12.5% in any index that could be
//! halved, which a full one keeps up to about 8,500 distinct trigrams. Measured on 512 KiB
//! chunks: build-log lines like the benchmark's 11.2%, Rust source 13% (23% at most). A text
//! lets a segment through only when all the trigrams of one residue pass: a text of ten
//! characters that a segment shares no trigram with gets through about once in 3,000
//! segments (`2 × 0.12^4`); a four-character one about once in 4 (`2 × 0.12`).
//!
//! Where it is stored: a zstd skippable frame before the segment's zstd frame (magic
//! [`FRAME_MAGIC`], the content's length, then a format byte and the filter's words,
//! little-endian). Every zstd decoder skips such frames, so a segment reads as before, also on
//! a coordinator that predates the index; segments written before it have no such frame and
//! are read whole. Not in the segment's metadata: replicated through Raft, up to 8 KiB per
//! 512 KiB chunk would have made the state machine, and every snapshot of it, grow by about 2%
//! of all log text ever stored, against about 0.05% for the rest of the metadata.
//!
//! The hash, the stride and the layout are a stored format: never change them without a new
//! format byte.
//! An index of a format this version does not know rules nothing out.

/// The largest index, in 64-bit words (8 KiB).
pub const MAX_WORDS: usize = 1024;
/// The only filter layout this version writes and reads.
const FORMAT: u8 = 1;
/// The skippable-frame magic number (zstd reserves 0x184D2A50 to 0x184D2A5F for them) that
/// marks a segment's text index.
pub const FRAME_MAGIC: u32 = 0x184d_2a5d;
/// The skippable frame's header: its magic and the length of what follows, both little-endian.
pub const FRAME_HEADER_BYTES: usize = 8;
/// The largest frame content: the format byte and a full-size filter.
const MAX_CONTENT_BYTES: usize = 1 + MAX_WORDS * 8;

/// The text index of one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogTextIndex {
    /// The filter: a power of two of words, at most [`MAX_WORDS`].
    words: Vec<u64>,
}

/// Every how many bytes of a segment's text a trigram is put in its index.
const STRIDE: usize = 2;

/// A text prepared for testing against indexes, once per search: its trigrams' probes in
/// [`STRIDE`] classes, by their offset in the text modulo the stride. Wherever the text sits in
/// a segment, the trigrams of one class are all at indexed positions.
#[derive(Debug, Clone)]
pub struct TextQuery {
    classes: Vec<Vec<Probe>>,
}

/// Where one trigram lives in a filter: the word (modulo the word count) and its bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Probe {
    word: u32,
    bit: u64,
}

impl Probe {
    /// Fibonacci hashing: the trigram times 2^64 / φ. Bits 32 and up of the product depend on
    /// every bit of a 24-bit trigram; bits 32-37 number the bit in the word, bits 38-63 the
    /// word (modulo the word count, so bits 38-47 at most).
    fn of(trigram: u32) -> Probe {
        let hash = u64::from(trigram).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Probe { word: (hash >> 38) as u32, bit: 1u64 << ((hash >> 32) & 63) }
    }
}

impl LogTextIndex {
    /// The index of a segment holding `messages` (as stored, before any lower-casing).
    pub fn build<'a>(messages: impl IntoIterator<Item = &'a str, IntoIter: Clone>) -> LogTextIndex {
        // The messages lower-cased, one after the other with a newline after each (a trigram
        // across two messages is only one more trigram in the filter), then a byte of padding
        // so that every trigram is read with one four-byte load. Building the index is CPU work
        // on every byte of log ingest, so its loop is kept this plain: per [`STRIDE`] bytes of
        // text one load, a multiplication and one bit set.
        let messages = messages.into_iter();
        let mut text = Vec::with_capacity(messages.clone().map(|message| message.len() + 1).sum::<usize>() + 1);
        for message in messages {
            if message.is_ascii() {
                text.extend_from_slice(message.as_bytes());
            } else {
                text.extend_from_slice(message.to_lowercase().as_bytes());
            }
            text.push(b'\n');
        }
        // What `to_lowercase` gives for ASCII; its output for other text has no ASCII capital.
        text.make_ascii_lowercase();
        let trigrams = text.len().saturating_sub(2);
        text.push(0);
        let mut words = vec![0u64; MAX_WORDS];
        for start in (0..trigrams).step_by(STRIDE) {
            let four_bytes: [u8; 4] = text[start..start + 4].try_into().expect("four bytes");
            let probe = Probe::of(u32::from_le_bytes(four_bytes) & 0x00ff_ffff);
            words[probe.word as usize & (MAX_WORDS - 1)] |= probe.bit;
        }
        while words.len() > 1 {
            let half = words.len() / 2;
            let set_bits: u32 = (0..half).map(|index| (words[index] | words[index + half]).count_ones()).sum();
            if set_bits as usize * 8 > half * 64 {
                break;
            }
            for index in 0..half {
                words[index] |= words[index + half];
            }
            words.truncate(half);
        }
        LogTextIndex { words }
    }

    /// The index as a zstd skippable frame, to put before the segment's zstd frame.
    pub fn to_frame(&self) -> Vec<u8> {
        let content_length = 1 + self.words.len() * 8;
        let mut frame = Vec::with_capacity(FRAME_HEADER_BYTES + content_length);
        frame.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
        frame.extend_from_slice(&(content_length as u32).to_le_bytes());
        frame.push(FORMAT);
        frame.extend(self.words.iter().flat_map(|word| word.to_le_bytes()));
        frame
    }

    /// How many bytes of content follow `header` (the first bytes of a segment's blob) when it
    /// starts an index frame; `None` when the segment has no index (written before it existed).
    pub fn frame_content_length(header: &[u8; FRAME_HEADER_BYTES]) -> Option<usize> {
        let [m0, m1, m2, m3, l0, l1, l2, l3] = *header;
        let length = u32::from_le_bytes([l0, l1, l2, l3]) as usize;
        (u32::from_le_bytes([m0, m1, m2, m3]) == FRAME_MAGIC && length <= MAX_CONTENT_BYTES).then_some(length)
    }

    /// The index in a frame's content; `None` (read the segment) for a format this version
    /// does not know or a filter that is not one.
    pub fn from_frame_content(content: &[u8]) -> Option<LogTextIndex> {
        let (&format, filter) = content.split_first()?;
        let word_count = filter.len() / 8;
        if format != FORMAT || filter.len() % 8 != 0 || !word_count.is_power_of_two() || word_count > MAX_WORDS {
            return None;
        }
        let words = filter.chunks_exact(8).map(|word| u64::from_le_bytes(word.try_into().expect("eight bytes"))).collect();
        Some(LogTextIndex { words })
    }

    /// False only when no message of the segment can contain the text of `query`.
    pub fn may_contain(&self, query: &TextQuery) -> bool {
        let mask = self.words.len() - 1;
        query.classes.iter().any(|class| class.iter().all(|probe| self.words[probe.word as usize & mask] & probe.bit != 0))
    }

    /// The filter's size in bytes.
    pub fn filter_bytes(&self) -> usize {
        self.words.len() * 8
    }
}

impl TextQuery {
    /// The query for a text as the search matches it (`text` lower-cased with
    /// `str::to_lowercase`), or `None` when it is too short for every class to hold a trigram
    /// (under `2 + STRIDE` bytes) and every segment must be read.
    pub fn new(lowered_text: &str) -> Option<TextQuery> {
        let bytes = lowered_text.as_bytes();
        if bytes.len() < 2 + STRIDE {
            return None;
        }
        let classes = (0..STRIDE)
            .map(|first| {
                let mut probes: Vec<Probe> = (first..bytes.len() - 2)
                    .step_by(STRIDE)
                    .map(|offset| {
                        Probe::of(u32::from(bytes[offset]) | (u32::from(bytes[offset + 1]) << 8) | (u32::from(bytes[offset + 2]) << 16))
                    })
                    .collect();
                probes.sort_unstable_by_key(|probe| (probe.word, probe.bit));
                probes.dedup();
                probes
            })
            .collect();
        Some(TextQuery { classes })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// What the search decides for a message, as `api::logs` does.
    fn search_matches(message: &str, text: &str) -> bool {
        message.to_lowercase().contains(&text.to_lowercase())
    }

    fn passes(index: &LogTextIndex, text: &str) -> bool {
        TextQuery::new(&text.to_lowercase()).is_none_or(|query| index.may_contain(&query))
    }

    #[test]
    fn texts_in_the_segment_pass_and_others_mostly_do_not() {
        let messages = ["   Compiling serde v1.0.210", "error[E0308]: mismatched types", "Größe überschritten", "ΟΔΟΣ closed"];
        let index = LogTextIndex::build(messages);
        for text in ["compiling SERDE", "E0308", "größe", "ÜBER", "οδος", "ΟΔΟΣ CL", "ser", "ab", "", "x"] {
            assert!(passes(&index, text), "{text:?}");
        }
        for text in ["checksum mismatch", "vendored blob 7f3a9c", "GRÖSSE"] {
            assert!(!passes(&index, text), "{text:?} is in no message");
        }
        // Two messages one after the other are not one text.
        assert!(!passes(&index, "serde v1.0.210error"));
        // Small segments get small indexes; an empty one rules out every text with a trigram.
        assert_eq!(index.filter_bytes(), 64);
        let empty = LogTextIndex::build([]);
        assert_eq!(empty.filter_bytes(), 8);
        assert!(!passes(&empty, "abcd") && passes(&empty, "abc"));
    }

    #[test]
    fn large_segments_stay_within_eight_kib() {
        // Every trigram of a-z and 0-9 (46,656 distinct ones), far more than a segment holds.
        let alphabet: Vec<char> = ('a'..='z').chain('0'..='9').collect();
        let mut messages = Vec::new();
        for a in &alphabet {
            for b in &alphabet {
                messages.extend(alphabet.iter().map(|c| format!("{a}{b}{c}")));
            }
        }
        let index = LogTextIndex::build(messages.iter().map(String::as_str));
        assert_eq!(index.filter_bytes(), MAX_WORDS * 8);
        assert!(messages.iter().all(|message| passes(&index, message)));
        assert_eq!(index.to_frame().len(), FRAME_HEADER_BYTES + MAX_CONTENT_BYTES);
    }

    /// The frame round-trips; a frame of another format, a filter that is not one, or a blob
    /// that does not start with an index frame gives no index (the segment is read).
    #[test]
    fn frames_of_other_formats_or_sizes_give_no_index() {
        let index = LogTextIndex::build(["one message", "and another"]);
        let frame = index.to_frame();
        let header: [u8; FRAME_HEADER_BYTES] = frame[..FRAME_HEADER_BYTES].try_into().unwrap();
        assert_eq!(LogTextIndex::frame_content_length(&header), Some(frame.len() - FRAME_HEADER_BYTES));
        assert_eq!(LogTextIndex::from_frame_content(&frame[FRAME_HEADER_BYTES..]), Some(index));
        let mut other_format = frame[FRAME_HEADER_BYTES..].to_vec();
        other_format[0] = 2;
        assert_eq!(LogTextIndex::from_frame_content(&other_format), None);
        assert_eq!(LogTextIndex::from_frame_content(&frame[FRAME_HEADER_BYTES..frame.len() - 1]), None);
        assert_eq!(LogTextIndex::from_frame_content(&[&[FORMAT][..], &[0u8; 24]].concat()), None, "three words");
        assert!(LogTextIndex::from_frame_content(&[&[FORMAT][..], &[0u8; 32]].concat()).is_some(), "four words");
        assert_eq!(LogTextIndex::from_frame_content(&[]), None);
        let mut too_long = header;
        too_long[4..].copy_from_slice(&(MAX_CONTENT_BYTES as u32 + 1).to_le_bytes());
        assert_eq!(LogTextIndex::frame_content_length(&too_long), None);
        let plain_zstd = zstd::encode_all(&b"{}\n"[..], 1).unwrap();
        assert_eq!(LogTextIndex::frame_content_length(&plain_zstd[..FRAME_HEADER_BYTES].try_into().unwrap()), None);
    }

    /// Format 1, frozen: this frame was written by this version and must read the same forever
    /// (the hash and the layout are the stored format).
    #[test]
    fn frozen_format_1() {
        let hex = |bytes: &[u8]| bytes.iter().map(|byte| format!("{byte:02x}")).collect::<String>();
        let stored = "5d2a4d1809000000014008800042000400";
        assert_eq!(hex(&LogTextIndex::build(["Disk full", "ok"]).to_frame()), stored);
        let bytes: Vec<u8> = (0..stored.len()).step_by(2).map(|at| u8::from_str_radix(&stored[at..at + 2], 16).unwrap()).collect();
        let index = LogTextIndex::from_frame_content(&bytes[FRAME_HEADER_BYTES..]).unwrap();
        assert!(passes(&index, "DISK") && passes(&index, "k fu"));
        assert!(!passes(&index, "disk empty") && !passes(&index, "okay"));
    }

    fn message() -> impl Strategy<Value = String> {
        // ASCII with both cases, and letters whose lower case changes length or depends on
        // context (İ, ẞ, Σ at a word's end), so that lower-casing is not byte for byte.
        prop::collection::vec(
            prop_oneof![4 => prop::char::range(' ', '~'), 1 => prop::sample::select(vec!['İ', 'ẞ', 'Σ', 'Ω', 'ö', 'Ö', 'K', '€', '日'])],
            0..40,
        )
        .prop_map(|chars| chars.into_iter().collect())
    }

    proptest! {
        /// No false negative: any substring of a message, lower-cased as the search does or in
        /// another case, passes the index whenever the search would match it.
        #[test]
        fn every_substring_of_a_message_passes(messages in prop::collection::vec(message(), 1..20), pick in any::<prop::sample::Index>(), start in any::<prop::sample::Index>(), length in 0usize..30) {
            let index = LogTextIndex::build(messages.iter().map(String::as_str));
            let message = &messages[pick.index(messages.len())];
            let chars: Vec<char> = message.chars().collect();
            let from = if chars.is_empty() { 0 } else { start.index(chars.len()) };
            let substring: String = chars[from..].iter().take(length).collect();
            let lowered = message.to_lowercase();
            let lowered_substring = &lowered[lowered.char_indices().nth(from.min(lowered.chars().count())).map_or(lowered.len(), |(at, _)| at)..];
            for text in [substring.clone(), substring.to_uppercase(), substring.to_lowercase(), lowered_substring.chars().take(length).collect()] {
                if messages.iter().any(|message| search_matches(message, &text)) {
                    prop_assert!(passes(&index, &text), "{text:?} is in {messages:?}");
                }
            }
            // Every substring of a lower-cased message matches by construction.
            prop_assert!(search_matches(message, &lowered_substring.chars().take(length).collect::<String>()));
        }

        /// The index's answer is the same read back from its frame (as stored in the blob).
        #[test]
        fn the_stored_index_answers_the_same(messages in prop::collection::vec(message(), 0..20), text in message()) {
            let index = LogTextIndex::build(messages.iter().map(String::as_str));
            let stored = LogTextIndex::from_frame_content(&index.to_frame()[FRAME_HEADER_BYTES..]).unwrap();
            prop_assert_eq!(passes(&index, &text), passes(&stored, &text));
            if messages.iter().any(|message| search_matches(message, &text)) {
                prop_assert!(passes(&stored, &text));
            }
        }
    }
}
