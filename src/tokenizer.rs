//! Byte-level BPE tokenizer, built with the `tokenizers` crate from a GGUF's vocabulary and
//! merges, or loaded from a Hugging Face `tokenizer.json`.
//!
//! The GGUF pre-tokenizer "smollm" (llama.cpp) is: split digits one by one, then GPT-2's
//! byte-level regex; that is `Sequence[Digits(individual), ByteLevel(no prefix space)]`.
//! No BOS is added (the model card and llama.cpp agree).

#![warn(missing_docs)]

use crate::error::{Error, Result};
use crate::gguf::{GgufFile, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

/// Qwen2's pre-tokenizer regex (its tokenizer.json; llama.cpp's `qwen2`).
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's pre-tokenizer regex (its tokenizer.json; llama.cpp's `llama-bpe`): digits in
/// groups of up to three.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF `tokenizer.ggml.token_type` value of control tokens.
const TOKEN_TYPE_CONTROL: u64 = 3;

/// A byte-level BPE tokenizer and the model's special token ids.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// End-of-sequence id: the GGUF's `tokenizer.ggml.eos_token_id`, or for a
    /// `tokenizer.json` see [`Tokenizer::from_file`].
    pub eos: Option<u32>,
    /// Beginning-of-sequence id: the GGUF's `tokenizer.ggml.bos_token_id`, or for a
    /// `tokenizer.json` see [`Tokenizer::from_file`]. Never added by [`Tokenizer::encode`];
    /// [`Tokenizer::encode_document`] adds it when [`Tokenizer::add_bos`] says the model
    /// expects it.
    pub bos: Option<u32>,
    /// Whether the model expects [`Tokenizer::bos`] at the start of a document (Llama 2 / 3
    /// do; SmolLM2 and Qwen2 do not): the GGUF's `tokenizer.ggml.add_bos_token`, by default
    /// true for the `llama-bpe` pre-tokenizer only (llama.cpp's rule), or for a
    /// `tokenizer.json` whether its post-processor starts a text with a token.
    pub add_bos: bool,
    /// The system prompt the model's chat template inserts when none is given.
    pub default_system: Option<String>,
}

/// The literal default system turn of a ChatML Jinja template, if it has one.
fn default_system_of(template: &str) -> Option<String> {
    let start = template.find("<|im_start|>system\n")? + "<|im_start|>system\n".len();
    let len = template[start..].find("<|im_end|>")?;
    let s = &template[start..start + len];
    (!s.contains('{')).then(|| s.to_string())
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Build from a GGUF's `tokenizer.ggml.*` metadata: tokens, merges, the pre-tokenizer
    /// (digits split one by one for `smollm` and `qwen2`), control tokens as special tokens,
    /// and the chat template's default system prompt. `Tokenizer` error unless the model is
    /// `gpt2` (byte-level BPE) or when a merge is malformed; `MissingMetadata` without the
    /// model name, tokens or merges.
    pub fn from_gguf(g: &GgufFile) -> Result<Tokenizer> {
        let model = g.meta_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(Error::Tokenizer(format!(
                "tokenizer model '{model}' is not supported (byte-level BPE 'gpt2' only)"
            )));
        }
        let pre = g.meta_str("tokenizer.ggml.pre").unwrap_or("default");
        let tokens = g.meta_strings("tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = g
            .meta_strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| Error::Tokenizer(format!("malformed merge '{m}'")))
            })
            .collect::<Result<_>>()?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(tok_err)?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        let split_then_bytes = |regex: &str| -> Result<PreTokenizerWrapper> {
            let split = Split::new(
                SplitPattern::Regex(regex.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(tok_err)?;
            Ok(Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into())
        };
        let pre_tok: PreTokenizerWrapper = match pre {
            // llama.cpp's "smollm": digits one by one, then GPT-2's regex.
            "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
            "qwen2" => split_then_bytes(QWEN2_REGEX)?,
            "llama-bpe" => split_then_bytes(LLAMA3_REGEX)?,
            "default" | "gpt-2" | "gpt2" => byte_level.into(),
            other => {
                return Err(Error::Tokenizer(format!(
                    "pre-tokenizer '{other}' is not supported (default, gpt-2, smollm, qwen2, llama-bpe)"
                )))
            }
        };
        inner.with_pre_tokenizer(Some(pre_tok));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        if let Some(types) = g
            .meta("tokenizer.ggml.token_type")
            .and_then(|v| v.as_array())
        {
            let special: Vec<AddedToken> = types
                .iter()
                .enumerate()
                .filter(|(_, t)| t.as_u64() == Some(TOKEN_TYPE_CONTROL))
                .filter_map(|(i, _)| tokens.get(i))
                .map(|t| AddedToken::from(t.to_string(), true))
                .collect();
            inner.add_special_tokens(&special);
        }
        let id = |k: &str| g.meta_u64(k).ok().map(|v| v as u32);
        let add_bos = match g.meta("tokenizer.ggml.add_bos_token") {
            Some(Value::Bool(b)) => *b,
            Some(v) => v.as_u64().is_some_and(|v| v != 0),
            None => pre == "llama-bpe",
        };
        Ok(Tokenizer {
            inner,
            eos: id("tokenizer.ggml.eos_token_id"),
            bos: id("tokenizer.ggml.bos_token_id"),
            add_bos,
            default_system: g
                .meta_str("tokenizer.chat_template")
                .ok()
                .and_then(default_system_of),
        })
    }

    /// A Hugging Face `tokenizer.json`. The EOS is the `eos_token` of the
    /// `tokenizer_config.json` beside it when that names a token of the vocabulary (a base
    /// model ends text with `<|endoftext|>`, its instruct sibling with `<|im_end|>`), else the
    /// first of `<|im_end|>`, `<|endoftext|>`, `</s>` in the vocabulary. The BOS is the token
    /// the tokenizer's post-processor puts before a text (Llama 3's `<|begin_of_text|>`), and
    /// then [`Tokenizer::add_bos`] is set unless tokenizer_config.json says
    /// `"add_bos_token": false`; otherwise it is that file's `bos_token`, not added.
    pub fn from_file(path: &std::path::Path) -> Result<Tokenizer> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(tok_err)?;
        let config = path
            .parent()
            .map(|d| d.join("tokenizer_config.json"))
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
        let configured = |key: &str| -> Option<u32> {
            let e = config.as_ref()?.get(key)?;
            let t = e
                .as_str()
                .or_else(|| e.get("content").and_then(|c| c.as_str()))?;
            inner.token_to_id(t)
        };
        let eos = configured("eos_token").or_else(|| {
            ["<|im_end|>", "<|endoftext|>", "</s>"]
                .iter()
                .find_map(|t| inner.token_to_id(t))
        });
        // what the post-processor adds to an empty text: a template's leading special token
        let added = inner
            .encode("", true)
            .map_err(tok_err)?
            .get_ids()
            .first()
            .copied();
        let refused = config
            .as_ref()
            .and_then(|c| c.get("add_bos_token"))
            .and_then(|v| v.as_bool())
            == Some(false);
        let bos = added.or_else(|| configured("bos_token"));
        Ok(Tokenizer {
            inner,
            eos,
            bos,
            add_bos: added.is_some() && !refused,
            default_system: None,
        })
    }

    /// Token ids of `text`, with no BOS or other tokens added; special tokens written in the
    /// text are recognised as such.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    /// Token ids of a whole document (a prompt, a text to score): [`Tokenizer::encode`], after
    /// the BOS when the model expects one ([`Tokenizer::add_bos`]). Multiple-choice scoring
    /// uses [`Tokenizer::encode`] alone, as lm-evaluation-harness does for causal models.
    pub fn encode_document(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if let (true, Some(b)) = (self.add_bos, self.bos) {
            ids.push(b);
        }
        ids.extend(self.encode(text)?);
        Ok(ids)
    }

    /// Text of `ids`, leaving out special tokens when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(tok_err)
    }

    /// Id of the token spelt exactly `token` (e.g. `<|im_end|>`), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size, added (special) tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// sha256 (hex) of everything that decides how this tokenizer encodes: its whole
    /// serialised definition (vocabulary, merges, pre-tokenizer, special tokens) and the
    /// BOS rule. Two tokenizers with one fingerprint encode every text alike.
    pub fn fingerprint(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(self.inner.to_string(false).map_err(tok_err)?.as_bytes());
        h.update(format!("\nbos={:?} add_bos={}", self.bos, self.add_bos).as_bytes());
        Ok(crate::files::hex(&h.finalize()))
    }
}

/// The ChatML template of SmolLM2-Instruct (and Qwen2): system turn, user turn, and the
/// opening of the assistant turn.
pub fn chatml(system: Option<&str>, user: &str) -> String {
    let mut s = String::new();
    if let Some(sys) = system {
        s.push_str(&format!("<|im_start|>system\n{sys}<|im_end|>\n"));
    }
    s.push_str(&format!(
        "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    ));
    s
}
