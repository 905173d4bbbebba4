//! A Hugging Face `tokenizer.json` from a GGUF's `tokenizer.ggml.*` metadata: byte-level
//! BPE (llama.cpp's `gpt2` kind) with the pre-tokenizer `tokenizer.ggml.pre` names.
use std::collections::{HashMap, HashSet};

use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// Llama 3's split (Hugging Face's `tokenizer.json` and llama.cpp's `llama-bpe`): up to
/// three digits together.
const LLAMA3_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split: single digits.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer names this import knows, for error messages.
pub const KNOWN_PRE: &[&str] = &[
    "default",
    "gpt2",
    "smollm",
    "starcoder",
    "refact",
    "codeshell",
    "llama-bpe",
    "llama3",
    "llama-v3",
    "smaug-bpe",
    "dbrx",
    "falcon3",
    "qwen2",
    "deepseek-r1-qwen",
];

/// The pre-tokenizer for llama.cpp's `tokenizer.ggml.pre` name, and whether the text
/// is NFC-normalised first (Qwen2's own tokenizer does that).
fn pre_tokenizer(pre: &str) -> Result<(PreTokenizerWrapper, bool), String> {
    let split = |re: &str| -> Result<PreTokenizerWrapper, String> {
        let split = Split::new(SplitPattern::Regex(re.into()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| format!("bad split regex: {e}"))?;
        // The regex split is done; ByteLevel only maps bytes to its alphabet.
        Ok(Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into())
    };
    Ok(match pre {
        // GPT-2's regex, which ByteLevel applies itself.
        "default" | "gpt2" => (ByteLevel::new(false, true, true).into(), false),
        // llama.cpp splits every digit off first ("\p{N}"), then applies GPT-2's regex;
        // SmolLM's own tokenizer.json says the same with Digits(individual_digits).
        "smollm" | "starcoder" | "refact" | "codeshell" => (
            Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into(),
            false,
        ),
        "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" | "dbrx" | "falcon3" => (split(LLAMA3_SPLIT)?, false),
        "qwen2" | "deepseek-r1-qwen" => (split(QWEN2_SPLIT)?, true),
        other => {
            return Err(format!(
                "pre-tokenizer {other:?} (tokenizer.ggml.pre) is not supported (supported: {})",
                KNOWN_PRE.join(", ")
            ));
        }
    })
}

/// GPT-2's byte-to-character table: byte-level BPE vocabularies spell every byte as
/// one printable character.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            extra += 1;
            char::from_u32(255 + extra).expect("valid code point")
        };
    }
    table
}

/// What the GGUF says about its tokenizer.
pub struct GgufVocab<'a> {
    pub tokens: Vec<&'a str>,
    pub token_types: Vec<i64>,
    pub merges: Vec<&'a str>,
    pub pre: &'a str,
    pub add_bos: bool,
    pub add_eos: bool,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
}

/// Builds the tokenizer. Errors are plain text: the caller names the file.
pub fn build(v: &GgufVocab<'_>) -> Result<Tokenizer, String> {
    let table = bytes_to_unicode();
    let alphabet: HashSet<char> = table.iter().copied().collect();
    // Some converters store tokens as raw UTF-8 rather than in the byte alphabet;
    // transformers' GGUF loader respells those, and so do we.
    let spell = |t: &str| -> String {
        if t.chars().all(|c| alphabet.contains(&c)) {
            t.to_string()
        } else {
            t.bytes().map(|b| table[b as usize]).collect()
        }
    };
    let mut vocab: HashMap<String, u32> = HashMap::with_capacity(v.tokens.len());
    for (id, t) in v.tokens.iter().enumerate() {
        // A duplicate keeps its first id, as a dict built in order would keep the last:
        // either way one id of the pair is unreachable by encoding; decoding is unaffected.
        vocab.entry(spell(t)).or_insert(id as u32);
    }
    let mut merges = Vec::with_capacity(v.merges.len());
    for m in &v.merges {
        let (a, b) = m.split_once(' ').ok_or_else(|| format!("merge {m:?} is not two tokens"))?;
        merges.push((a.to_string(), b.to_string()));
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), merges)
        .build()
        .map_err(|e| format!("cannot build the BPE model: {e}"))?;
    let mut tk = Tokenizer::new(bpe);
    let (pre, nfc) = pre_tokenizer(v.pre)?;
    if nfc {
        tk.with_normalizer(Some(NFC));
    }
    tk.with_pre_tokenizer(Some(pre));
    tk.with_decoder(Some(ByteLevel::default()));

    // Control tokens (<|im_start|>, <|endoftext|>) are matched whole and skipped when
    // decoding with skip_special_tokens; user-defined ones are matched whole too (as
    // llama.cpp does) but are text. A control token outside the byte alphabet is a
    // mislabel of llama.cpp's converter; transformers skips those, and so do we.
    let kind = |i: usize| v.token_types.get(i).copied().unwrap_or(1);
    let control: Vec<AddedToken> = (0..v.tokens.len())
        .filter(|&i| kind(i) == CONTROL && v.tokens[i].chars().all(|c| alphabet.contains(&c)))
        .map(|i| AddedToken::from(v.tokens[i], true).normalized(false))
        .collect();
    let user: Vec<AddedToken> = (0..v.tokens.len())
        .filter(|&i| kind(i) == USER_DEFINED)
        .map(|i| AddedToken::from(v.tokens[i], false).normalized(false))
        .collect();
    tk.add_special_tokens(&control);
    tk.add_tokens(&user);

    let token = |id: Option<u32>, what: &str| -> Result<Option<(String, u32)>, String> {
        match id {
            None => Ok(None),
            Some(i) => v
                .tokens
                .get(i as usize)
                .map(|t| Some((t.to_string(), i)))
                .ok_or_else(|| format!("{what} token id {i} is outside the vocabulary of {}", v.tokens.len())),
        }
    };
    let bos = token(v.bos, "BOS")?;
    let eos = token(v.eos, "EOS")?;
    let (bos, eos) = (bos.filter(|_| v.add_bos), eos.filter(|_| v.add_eos));
    if bos.is_some() || eos.is_some() {
        let (b, e) = (
            bos.as_ref().map(|(t, _)| format!("{t} ")).unwrap_or_default(),
            eos.as_ref().map(|(t, _)| format!(" {t}")).unwrap_or_default(),
        );
        let specials: Vec<(String, u32)> = bos.into_iter().chain(eos).collect();
        let template = TemplateProcessing::builder()
            .try_single(format!("{b}$A{e}"))
            .and_then(|t| t.try_pair(format!("{b}$A{e} {b}$B:1{e}")))
            .map_err(|e| format!("cannot build the BOS/EOS template: {e}"))?
            .special_tokens(specials)
            .build()
            .map_err(|e| format!("cannot build the BOS/EOS template: {e}"))?;
        tk.with_post_processor(Some(template));
    } else {
        // What byte-level tokenizer.json files carry: offsets without trimming, no ids.
        tk.with_post_processor(Some(ByteLevel::new(true, false, true)));
    }
    Ok(tk)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_gpt2s() {
        let t = bytes_to_unicode();
        assert_eq!(t[b'A' as usize], 'A');
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[0], 'Ā');
        assert_eq!(t.iter().collect::<HashSet<_>>().len(), 256);
    }

    #[test]
    fn unknown_pre_tokenizer_is_refused() {
        let e = pre_tokenizer("mystery").err().unwrap();
        assert!(e.contains("mystery") && e.contains("smollm"), "{e}");
    }

    fn tiny(pre: &str) -> Tokenizer {
        // Bytes as single tokens plus a few merges: enough to see each split.
        let mut tokens: Vec<String> = bytes_to_unicode().iter().map(|c| c.to_string()).collect();
        tokens.extend(["12", "123", "Ġ1", "he", "hel", "hell", "hello", "<|s|>"].map(String::from));
        // "Ġ 1" ranks first, so GPT-2's " 123" piece becomes "Ġ1".
        let merges = ["Ġ 1", "1 2", "12 3", "h e", "he l", "hel l", "hell o"];
        let mut types = vec![1; tokens.len()];
        *types.last_mut().unwrap() = CONTROL;
        let v = GgufVocab {
            tokens: tokens.iter().map(String::as_str).collect(),
            token_types: types,
            merges: merges.to_vec(),
            pre,
            add_bos: false,
            add_eos: false,
            bos: None,
            eos: None,
        };
        build(&v).unwrap()
    }

    fn pieces(tk: &Tokenizer, text: &str) -> Vec<String> {
        tk.encode(text, true).unwrap().get_tokens().to_vec()
    }

    #[test]
    fn splits_follow_the_named_pre_tokenizer() {
        // GPT-2 keeps a run of digits (with its space) together, so merges apply.
        assert_eq!(pieces(&tiny("gpt2"), "hello 123"), ["hello", "Ġ1", "2", "3"]);
        // SmolLM splits every digit off first.
        assert_eq!(pieces(&tiny("smollm"), "hello 123"), ["hello", "Ġ", "1", "2", "3"]);
        // Llama 3 groups up to three digits, without the space.
        assert_eq!(pieces(&tiny("llama-bpe"), "hello 1234"), ["hello", "Ġ", "123", "4"]);
        // Qwen2: single digits.
        assert_eq!(pieces(&tiny("qwen2"), "hello 123"), ["hello", "Ġ", "1", "2", "3"]);
        // Control tokens are matched whole.
        assert_eq!(pieces(&tiny("smollm"), "<|s|>hello"), ["<|s|>", "hello"]);
    }
}
