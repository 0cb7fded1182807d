//! CLIP byte-level BPE tokenizer, producing the same ids as open_clip's `SimpleTokenizer`
//! (spec §6.3): clean (ftfy-like fixes, HTML unescape twice, whitespace collapse, lower-case), split with
//! CLIP's regex, byte→unicode map, BPE by merge rank, SOT/EOT, pad or truncate to the context length.

mod clean;
pub mod hf;

use std::collections::HashMap;
use std::io::Read;
use std::sync::Mutex;

pub use clean::{clean_text, clean_whitespace};
pub use hf::{HfTokenizer, TextTokenizer};

pub const SOT: i64 = 49406;
pub const EOT: i64 = 49407;
pub const CONTEXT_LENGTH: usize = 77;

/// The CLIP vocabulary shipped with pirclip (MIT, OpenAI CLIP).
pub const DEFAULT_BPE_GZ: &[u8] = include_bytes!("../../../assets/bpe_simple_vocab_16e6.txt.gz");

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("BPE vocabulary: {0}")]
    Vocab(String),
}

pub struct Tokenizer {
    encoder: HashMap<String, i64>,
    ranks: HashMap<(String, String), usize>,
    byte_encoder: [char; 256],
    pattern: regex::Regex,
    cache: Mutex<HashMap<String, Vec<i64>>>,
}

/// GPT-2/CLIP's reversible map from bytes to printable unicode characters, as (byte, char) pairs in the
/// order Python's dict holds them (printable bytes first): that order defines the first 512 vocabulary ids.
fn bytes_to_unicode() -> Vec<(u8, char)> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    printable
        .into_iter()
        .zip(chars)
        .map(|(b, c)| (b as u8, char::from_u32(c).unwrap()))
        .collect()
}

impl Tokenizer {
    /// One process-wide tokenizer with the bundled vocabulary: building one decompresses and parses 49k
    /// merges (tens of milliseconds), too slow to repeat per query.
    pub fn shared() -> &'static Tokenizer {
        static SHARED: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
        SHARED.get_or_init(Tokenizer::new)
    }

    /// The tokenizer with the bundled CLIP vocabulary.
    pub fn new() -> Self {
        Self::from_gz(DEFAULT_BPE_GZ).expect("bundled vocabulary is valid")
    }

    /// Builds the tokenizer from a gzip'd merges file (`bpe_simple_vocab_16e6.txt.gz`).
    pub fn from_gz(gz: &[u8]) -> Result<Self, Error> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_string(&mut text)
            .map_err(|e| Error::Vocab(format!("cannot decompress: {e}")))?;
        // open_clip keeps lines 1 ..= 49152-256-2 of the file (line 0 is a version header).
        let merges: Vec<(String, String)> = text
            .split('\n')
            .skip(1)
            .take(49152 - 256 - 2)
            .map(|line| {
                let mut it = line.split_whitespace();
                match (it.next(), it.next()) {
                    (Some(a), Some(b)) => Ok((a.to_string(), b.to_string())),
                    _ => Err(Error::Vocab(format!("malformed merge line {line:?}"))),
                }
            })
            .collect::<Result<_, _>>()?;
        let pairs = bytes_to_unicode();
        let mut vocab: Vec<String> = pairs.iter().map(|(_, c)| c.to_string()).collect();
        vocab.extend(pairs.iter().map(|(_, c)| format!("{c}</w>")));
        let mut byte_encoder = ['\0'; 256];
        for (b, c) in pairs {
            byte_encoder[b as usize] = c;
        }
        vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        vocab.push("<start_of_text>".into());
        vocab.push("<end_of_text>".into());
        if vocab.len() != 49408 {
            return Err(Error::Vocab(format!(
                "expected 49408 entries, built {}",
                vocab.len()
            )));
        }
        let encoder = vocab
            .into_iter()
            .enumerate()
            .map(|(i, v)| (v, i as i64))
            .collect();
        let ranks = merges
            .into_iter()
            .enumerate()
            .map(|(i, m)| (m, i))
            .collect();
        let pattern = regex::Regex::new(
            r"(?i)<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
        )
        .unwrap();
        Ok(Tokenizer {
            encoder,
            ranks,
            byte_encoder,
            pattern,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Token ids of one pre-tokenised piece (already byte-encoded), by lowest-rank-first merging.
    ///
    /// open_clip repeats: find the lowest-ranked adjacent pair, merge all its non-overlapping occurrences
    /// left to right. That is quadratic in the word's length (minutes for a 1 MB word). This does the same
    /// passes with a heap of (rank, position): a pass pops every occurrence of one rank in position order,
    /// skips those a merge in the same pass consumed, and queues the pairs its merges create only after the
    /// pass, so the result is identical for every word, in O(n log n).
    fn bpe(&self, token: &str) -> Vec<i64> {
        const CACHED_WORD_BYTES: usize = 64;
        const CACHE_ENTRIES: usize = 100_000;
        if let Some(ids) = self.cache.lock().unwrap().get(token) {
            return ids.clone();
        }
        let mut word: Vec<String> = token.chars().map(|c| c.to_string()).collect();
        if let Some(last) = word.last_mut() {
            last.push_str("</w>");
        }
        let n = word.len();
        let mut next: Vec<usize> = (1..=n).collect(); // n = none
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect(); // usize::MAX = none
        let mut alive = vec![true; n];
        let rank = |a: &str, b: &str| self.ranks.get(&(a.to_string(), b.to_string())).copied();
        let mut heap = std::collections::BinaryHeap::new();
        for i in 0..n.saturating_sub(1) {
            if let Some(r) = rank(&word[i], &word[i + 1]) {
                heap.push(std::cmp::Reverse((r, i)));
            }
        }
        while let Some(&std::cmp::Reverse((r, _))) = heap.peek() {
            let mut created = Vec::new();
            while let Some(&std::cmp::Reverse((r2, i))) = heap.peek() {
                if r2 != r {
                    break;
                }
                heap.pop();
                let j = next[i];
                if !alive[i] || j >= n || rank(&word[i], &word[j]) != Some(r) {
                    continue; // consumed or changed by an earlier merge
                }
                let right = std::mem::take(&mut word[j]);
                word[i].push_str(&right);
                alive[j] = false;
                next[i] = next[j];
                if next[j] < n {
                    prev[next[j]] = i;
                }
                created.push(i);
            }
            for i in created {
                if !alive[i] {
                    continue;
                }
                if prev[i] != usize::MAX {
                    if let Some(r) = rank(&word[prev[i]], &word[i]) {
                        heap.push(std::cmp::Reverse((r, prev[i])));
                    }
                }
                if next[i] < n {
                    if let Some(r) = rank(&word[i], &word[next[i]]) {
                        heap.push(std::cmp::Reverse((r, i)));
                    }
                }
            }
        }
        let ids: Vec<i64> = (0..n)
            .filter(|&i| alive[i])
            .map(|i| self.encoder[word[i].as_str()])
            .collect();
        if token.len() <= CACHED_WORD_BYTES {
            let mut cache = self.cache.lock().unwrap();
            if cache.len() >= CACHE_ENTRIES {
                cache.clear(); // bounded: a server tokenising endless new words must not grow forever
            }
            cache.insert(token.to_string(), ids.clone());
        }
        ids
    }

    /// Token ids of the cleaned text, without SOT/EOT.
    pub fn encode(&self, text: &str) -> Vec<i64> {
        self.encode_up_to(text, usize::MAX)
    }

    /// The first ids of `encode(text)`: at least `limit` of them when there are that many (the pieces after
    /// the limit is reached are not encoded).
    fn encode_up_to(&self, text: &str, limit: usize) -> Vec<i64> {
        let text = clean_text(text);
        let mut ids = Vec::new();
        for m in self.pattern.find_iter(&text) {
            if ids.len() >= limit {
                break;
            }
            let piece = m.as_str();
            match piece {
                "<start_of_text>" => ids.push(SOT),
                "<end_of_text>" => ids.push(EOT),
                _ => {
                    let encoded: String = piece
                        .bytes()
                        .map(|b| self.byte_encoder[b as usize])
                        .collect();
                    ids.extend(self.bpe(&encoded));
                }
            }
        }
        ids
    }

    /// `[SOT] + ids + [EOT]`, zero-padded to `context_length`; longer sequences are cut and end in EOT.
    pub fn tokenize(&self, text: &str, context_length: usize) -> Vec<i64> {
        let mut seq = Vec::with_capacity(context_length);
        seq.push(SOT);
        // Only the first context_length - 2 ids can survive the truncation below.
        seq.extend(self.encode_up_to(text, context_length.saturating_sub(2)));
        seq.push(EOT);
        if seq.len() > context_length {
            seq.truncate(context_length);
            seq[context_length - 1] = EOT;
        }
        seq.resize(context_length, 0);
        seq
    }

    /// Tokenises a batch into a row-major `[n, context_length]` buffer.
    pub fn tokenize_batch<S: AsRef<str>>(&self, texts: &[S], context_length: usize) -> Vec<i64> {
        texts
            .iter()
            .flat_map(|t| self.tokenize(t.as_ref(), context_length))
            .collect()
    }
}

impl Default for Tokenizer {
    fn default() -> Self {
        Self::new()
    }
}

/// Position of the EOT token (the first maximum id), as open_clip's text pooling finds it.
pub fn eot_position(ids: &[i64]) -> usize {
    let mut best = 0;
    for (i, &v) in ids.iter().enumerate() {
        if v > ids[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_examples() {
        let t = Tokenizer::new();
        let ids = t.tokenize("The airport is very large .", 77);
        assert_eq!(&ids[..8], &[49406, 518, 3259, 533, 1070, 3638, 269, 49407]);
        assert!(ids[8..].iter().all(|&v| v == 0));
        assert_eq!(&t.tokenize("", 77)[..3], &[49406, 49407, 0]);
        assert_eq!(
            &t.tokenize("It's 3 storage-tanks &amp; a   pond", 77)[..11],
            &[49406, 585, 568, 274, 6824, 268, 14223, 261, 320, 10750, 49407]
        );
    }

    /// open_clip's algorithm, pass by pass (quadratic): the reference for the heap version.
    fn bpe_reference(t: &Tokenizer, token: &str) -> Vec<i64> {
        let mut word: Vec<String> = token.chars().map(|c| c.to_string()).collect();
        if let Some(last) = word.last_mut() {
            last.push_str("</w>");
        }
        while word.len() > 1 {
            let best = word
                .windows(2)
                .filter_map(|w| {
                    t.ranks
                        .get(&(w[0].clone(), w[1].clone()))
                        .map(|&r| (r, w[0].clone(), w[1].clone()))
                })
                .min_by_key(|(r, _, _)| *r);
            let Some((_, first, second)) = best else {
                break;
            };
            let mut merged = Vec::new();
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && word[i] == first && word[i + 1] == second {
                    merged.push(format!("{first}{second}"));
                    i += 2;
                } else {
                    merged.push(word[i].clone());
                    i += 1;
                }
            }
            word = merged;
        }
        word.iter().map(|w| t.encoder[w.as_str()]).collect()
    }

    #[test]
    fn heap_bpe_equals_the_pass_by_pass_algorithm() {
        let t = Tokenizer::new();
        let mut words: Vec<String> = [
            "a",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "abababababababababab",
            "storagetanks",
            "mississippi",
            "hellohellohello",
            "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
            "ééééééé",
            "12341234",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let letters: Vec<char> = "aeiourstlnmbcdpk".chars().collect();
        for len in 1..400 {
            let w: String = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    letters[(x % letters.len() as u64) as usize]
                })
                .collect();
            words.push(w);
        }
        for w in words {
            let encoded: String = w.bytes().map(|b| t.byte_encoder[b as usize]).collect();
            assert_eq!(t.bpe(&encoded), bpe_reference(&t, &encoded), "{w}");
        }
    }

    #[test]
    fn a_one_megabyte_word_is_tokenised_in_bounded_time() {
        let t = Tokenizer::new();
        for word in [
            "ab".repeat(1 << 19),
            "x".repeat(1 << 20),
            "storagetank".repeat(95_000),
        ] {
            let started = std::time::Instant::now();
            let ids = t.tokenize(&word, 77);
            // A bound on complexity, not a speed goal: the pass-by-pass algorithm takes minutes here.
            assert!(started.elapsed().as_secs() < 30, "{:?}", started.elapsed());
            assert_eq!((ids.len(), ids[0], ids[76]), (77, SOT, EOT));
        }
        // Many words: only the pieces that can reach the 77 tokens are encoded.
        let many = "a storage tank ".repeat(70_000);
        assert_eq!(
            t.tokenize(&many, 77)[..4],
            t.tokenize("a storage tank", 77)[..4]
        );
    }

    #[test]
    fn truncation_ends_in_eot() {
        let t = Tokenizer::new();
        let ids = t.tokenize(&"a ".repeat(100), 77);
        assert_eq!(ids.len(), 77);
        assert_eq!(ids[76], EOT);
        assert_eq!(eot_position(&ids), 76);
    }
}
