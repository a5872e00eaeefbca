//! The base model's tokenizer and chat template: chat messages to prompt token ids (the model's
//! own Jinja template from `tokenizer_config.json`, rendered with minijinja, tokenised by its
//! `tokenizer.json`), the token that ends an assistant turn, and token ids back to text as they
//! stream ([`Detokenizer`]: a piece is given out only once it is whole UTF-8).
//!
//! Serving and training both tokenise through this, so they cannot drift apart.

use std::path::Path;
use std::sync::OnceLock;

use serde::Serialize;
use tokenizers::Tokenizer;

use super::cite::CitationVocab;

/// Who says a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

/// A tokenizer or template problem.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ChatError(pub String);

/// The tokenizer and template of one model directory.
#[derive(Debug)]
pub struct ChatTokenizer {
    tokenizer: Tokenizer,
    /// The chat template, parsed once (as [`CHAT_TEMPLATE`]).
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
    end_of_turn: u32,
    /// Every token's text for the citation rule, decoded on first use.
    citations: OnceLock<CitationVocab>,
}

/// The chat template's name in its environment.
const CHAT_TEMPLATE: &str = "chat";

/// An environment holding the model's chat template, parsed, with the Python string methods and
/// the `raise_exception` function HF templates use.
fn template_env(template: String) -> Result<minijinja::Environment<'static>, minijinja::Error> {
    let mut env = minijinja::Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, _> {
        Err(minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            msg,
        ))
    });
    env.add_template_owned(CHAT_TEMPLATE, template)?;
    Ok(env)
}

/// Turn off the model's word cache (BPE tokenizers keep one).
///
/// Why: tokenizers 0.23 keeps that cache per thread, up to 10,000 words each (~4.5 MiB for this
/// model's BPE once full), so a server's memory grew with every thread that tokenised a prompt
/// and with every new word it saw, filling over hundreds of answers (the slow rise of issue 14's
/// soak). Without it a prompt costs 0.07-0.16 ms more per 120 words (~1 ms for a RAG prompt;
/// `benches/tokenizer_cache.py`, the same Rust code through Python's `tokenizers`), nothing next
/// to its prefill.
fn without_word_cache(tokenizer: &mut Tokenizer) {
    let mut model = tokenizer.get_model().clone();
    model.resize_cache(0);
    tokenizer.with_model(model);
}

/// A special token in `tokenizer_config.json`: a string, or `{"content": ...}`.
fn special(config: &serde_json::Value, key: &str) -> String {
    match &config[key] {
        serde_json::Value::String(s) => s.clone(),
        v => v["content"].as_str().unwrap_or_default().to_string(),
    }
}

impl ChatTokenizer {
    /// Read `tokenizer.json` and `tokenizer_config.json` (its `chat_template`) from `dir`.
    pub fn load(dir: &Path) -> Result<ChatTokenizer, ChatError> {
        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| ChatError(format!("{}: {e}", dir.join("tokenizer.json").display())))?;
        without_word_cache(&mut tokenizer);
        let path = dir.join("tokenizer_config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ChatError(format!("{}: {e}", path.display())))?;
        let config: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ChatError(format!("{}: {e}", path.display())))?;
        let template = config["chat_template"]
            .as_str()
            .ok_or_else(|| ChatError(format!("{} has no chat_template", path.display())))?
            .to_string();
        let mut chat = ChatTokenizer {
            tokenizer,
            env: template_env(template)
                .map_err(|e| ChatError(format!("{}: chat_template: {e}", path.display())))?,
            bos: special(&config, "bos_token"),
            eos: special(&config, "eos_token"),
            end_of_turn: 0,
            citations: OnceLock::new(),
        };
        chat.end_of_turn = chat.find_end_of_turn()?;
        Ok(chat)
    }

    /// The template rendered for `messages` (with the generation prompt when asked).
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        self.env
            .get_template(CHAT_TEMPLATE)
            .and_then(|t| {
                t.render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                    bos_token => &self.bos,
                    eos_token => &self.eos,
                })
            })
            .map_err(|e| ChatError(format!("chat template: {e}")))
    }

    /// The prompt's token ids: the template with the generation prompt, tokenised.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, ChatError> {
        let text = self.render(messages, true)?;
        self.encode(&text, true)
    }

    /// Token ids of `text` alone (no special tokens added).
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>, ChatError> {
        self.encode(text, false)
    }

    fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, ChatError> {
        self.tokenizer
            .encode(text, special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ChatError(format!("tokenizer: {e}")))
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ChatError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| ChatError(format!("tokenizer: {e}")))
    }

    /// Every token's text, for the rule that answers cite only the sources given.
    pub fn citation_vocab(&self) -> &CitationVocab {
        self.citations
            .get_or_init(|| CitationVocab::from_tokenizer(&self.tokenizer))
    }

    /// The token that ends an assistant turn (generation stops there).
    pub fn end_of_turn(&self) -> u32 {
        self.end_of_turn
    }

    /// The template renders `...answer<end>\n` or `...answer<end>`: the first token after the
    /// answer's own tokens is the end-of-turn token.
    fn find_end_of_turn(&self) -> Result<u32, ChatError> {
        let probe = [
            ChatMessage {
                role: Role::User,
                content: "q".into(),
            },
            ChatMessage {
                role: Role::Assistant,
                content: "zebra".into(),
            },
        ];
        let ids = self.encode(&self.render(&probe, false)?, true)?;
        let answer = self.encode_text("zebra")?;
        let at = ids
            .windows(answer.len())
            .rposition(|w| w == answer.as_slice())
            .ok_or_else(|| ChatError("cannot find the end-of-turn token".into()))?;
        ids.get(at + answer.len())
            .copied()
            .ok_or_else(|| ChatError("the chat template ends without an end-of-turn token".into()))
    }
}

/// Token ids to text as they arrive: each call gives the new text once it is whole (a multi-byte
/// character split over tokens waits for its last token), decoding a short window of ids so
/// that merges across token boundaries (spaces, byte-level pieces) come out as in a whole decode.
/// The answer's leading whitespace is dropped (its first token usually starts with a space), as
/// mistral.rs does.
#[derive(Debug, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    /// Whether text has been given out.
    started: bool,
    /// Start of the window decoded for context.
    prefix: usize,
    /// Ids before this one have been given out.
    read: usize,
}

impl Detokenizer {
    /// Add `id`; the text it completes, if any.
    pub fn push(&mut self, chat: &ChatTokenizer, id: u32) -> Result<Option<String>, ChatError> {
        self.ids.push(id);
        let before = chat.decode(&self.ids[self.prefix..self.read])?;
        let now = chat.decode(&self.ids[self.prefix..])?;
        // A character split over tokens waits for its last byte (4 at most); past that the bytes
        // are invalid and come out as U+FFFD, so the window never grows without bound.
        if now.ends_with('\u{FFFD}') && self.ids.len() - self.read < 4 {
            return Ok(None);
        }
        let piece = match now.get(before.len()..).filter(|_| now.starts_with(&before)) {
            // Tokens that decode to nothing (special tokens) move the window on as well.
            Some(piece) => piece,
            // The context decodes differently with the new tokens: wait for a few more, then
            // give out what follows the common part.
            None if self.ids.len() - self.read < 4 => return Ok(None),
            None => {
                let common = before
                    .char_indices()
                    .zip(now.chars())
                    .find(|((_, a), b)| a != b)
                    .map_or(before.len().min(now.len()), |((at, _), _)| at);
                &now[common..]
            }
        };
        let piece = self.start(piece);
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(piece)
    }

    /// `piece` as given out: without leading whitespace while nothing has been.
    fn start(&mut self, piece: &str) -> Option<String> {
        let piece = if self.started {
            piece
        } else {
            piece.trim_start()
        };
        if piece.is_empty() {
            return None;
        }
        self.started = true;
        Some(piece.to_string())
    }

    /// What is still held back at the end of the answer (an incomplete character comes out as
    /// U+FFFD).
    pub fn finish(&mut self, chat: &ChatTokenizer) -> Result<Option<String>, ChatError> {
        let before = chat.decode(&self.ids[self.prefix..self.read])?;
        let now = chat.decode(&self.ids[self.prefix..])?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(now
            .get(before.len()..)
            .filter(|_| now.starts_with(&before))
            .and_then(|p| self.start(p)))
    }
}
