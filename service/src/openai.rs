//! The OpenAI API shapes the router and the twin's engine face share: how
//! long a request's prompt is, in tokens, for every request shape of the
//! completions and chat APIs (a string, a batch of strings, token ids, a
//! batch of id lists; chat messages with text, parts, images, `content:
//! null` and tool calls, and the tools offered), and OpenAI's error object.
//!
//! Text is counted with a real BPE tokenizer (`cl100k_base`, shipped inside
//! the `tiktoken-rs` crate, the vocabulary family of Llama 3's tokenizer):
//! an engine's own `/tokenize` is exact for its model and the router asks it
//! first; this count is what the router falls back on within its latency
//! budget, and what the twin's engine counts.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::Value;

/// Tokens a chat message costs beyond its content (role and separators).
pub const MESSAGE_OVERHEAD_TOKENS: u32 = 4;
/// Tokens an image part costs (a typical vision encoder's patch count).
pub const IMAGE_TOKENS: u32 = 576;
/// The longest text counted exactly (bytes); beyond it the count is scaled
/// from its first part, so a hostile 100 MB prompt costs no more than this.
pub const MAX_COUNTED_BYTES: usize = 1 << 20;

/// An error answer in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`,
/// its `type` from the status as OpenAI's API sets it.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let kind = match status.as_u16() {
        400 | 404 | 409 | 413 | 415 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        429 => "rate_limit_error",
        503 => "service_unavailable_error",
        _ if status.is_server_error() => "server_error",
        _ => "invalid_request_error",
    };
    let body = serde_json::json!({
        "error": { "message": message.into(), "type": kind, "param": null, "code": status.as_u16() }
    });
    (status, Json(body)).into_response()
}

/// Tokens of a text with the `cl100k_base` BPE.
pub fn text_tokens(text: &str) -> u32 {
    let bpe = tiktoken_rs::cl100k_base_singleton();
    if text.len() <= MAX_COUNTED_BYTES {
        return bpe.encode_ordinary(text).len().min(u32::MAX as usize) as u32;
    }
    let mut cut = MAX_COUNTED_BYTES;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let head = bpe.encode_ordinary(&text[..cut]).len() as f64;
    (head * text.len() as f64 / cut as f64).min(f64::from(u32::MAX)) as u32
}

/// The prompt of a completions request, as the engine will see it.
fn prompt_lengths(p: &Value) -> Result<Vec<u32>, String> {
    match p {
        Value::String(s) => Ok(vec![text_tokens(s).max(1)]),
        Value::Array(a) if a.is_empty() => Err("`prompt` is an empty array".into()),
        Value::Array(a) if a.iter().all(Value::is_u64) => Ok(vec![a.len() as u32]),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, x)| match x {
                Value::String(s) => Ok(text_tokens(s).max(1)),
                Value::Array(ids) if !ids.is_empty() && ids.iter().all(Value::is_u64) => Ok(ids.len() as u32),
                _ => Err(format!("`prompt[{i}]` must be a string or an array of token ids")),
            })
            .collect(),
        _ => Err("`prompt` must be a string, an array of strings, an array of token ids, or an array of those".into()),
    }
}

/// The prompt tokens of one chat message: its content (text, parts), and
/// the tool calls an assistant made or a tool's answer.
fn message_tokens(i: usize, m: &Value) -> Result<u32, String> {
    let mut n = MESSAGE_OVERHEAD_TOKENS;
    match &m["content"] {
        Value::Null => {}
        Value::String(s) => n += text_tokens(s),
        Value::Array(parts) => {
            for (j, p) in parts.iter().enumerate() {
                match p["type"].as_str() {
                    Some("text") | None if p["text"].is_string() => n += text_tokens(p["text"].as_str().unwrap_or("")),
                    Some("image_url") | Some("input_image") | Some("image") => n += IMAGE_TOKENS,
                    Some("input_audio") | Some("file") | Some("refusal") => {}
                    _ => return Err(format!("`messages[{i}].content[{j}]` is not a content part")),
                }
            }
        }
        _ => return Err(format!("`messages[{i}].content` must be a string, an array of parts, or null")),
    }
    if let Some(calls) = m["tool_calls"].as_array() {
        for c in calls {
            n += text_tokens(c["function"]["name"].as_str().unwrap_or(""));
            n += text_tokens(c["function"]["arguments"].as_str().unwrap_or(""));
        }
    }
    Ok(n)
}

/// How many prompt tokens a request carries, for the request's class: the
/// longest prompt of a batched completions request (each is its own
/// sequence), or a chat's messages plus the tools it offers. A body with
/// neither `prompt` nor `messages` is refused.
pub fn prompt_tokens(v: &Value) -> Result<u32, String> {
    if !v["prompt"].is_null() {
        return Ok(prompt_lengths(&v["prompt"])?.into_iter().max().unwrap_or(1).max(1));
    }
    let msgs = match &v["messages"] {
        Value::Array(m) => m,
        Value::Null => return Err("the body needs `prompt` or `messages`".into()),
        _ => return Err("`messages` must be an array".into()),
    };
    let mut n = 0u32;
    for (i, m) in msgs.iter().enumerate() {
        n = n.saturating_add(message_tokens(i, m)?);
    }
    if let Some(tools) = v["tools"].as_array() {
        for t in tools {
            n = n.saturating_add(text_tokens(&t.to_string()));
        }
    }
    Ok(n.max(1))
}

/// How many sequences a request asks the engine for: prompts in a batch
/// times `n` completions of each.
pub fn sequences(v: &Value) -> u32 {
    let prompts = match &v["prompt"] {
        Value::Array(a) if !a.is_empty() && !a.iter().all(Value::is_u64) => a.len() as u32,
        _ => 1,
    };
    prompts.saturating_mul(v["n"].as_u64().unwrap_or(1).clamp(1, 128) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A prompt of Chinese text has as many tokens as the BPE makes of it,
    /// not one "word": 2,000 characters are well over 1,000 tokens.
    #[test]
    fn chinese_text_counts_its_tokens_not_its_words() {
        let text = "深度学习模型在推理时消耗大量能源。".repeat(118);
        assert!(text.chars().count() >= 2000);
        let n = prompt_tokens(&serde_json::json!({ "prompt": text })).unwrap();
        assert!(n > 1500, "{n}");
        assert_eq!(text.split_whitespace().count(), 1);
    }

    /// Every shape of the two APIs is accepted: a batch of strings (the
    /// longest counts), id lists, `content: null` with tool calls, parts
    /// with an image, and the tools offered add to the prompt.
    #[test]
    fn every_request_shape_has_a_length() {
        let batch = serde_json::json!({ "prompt": ["one two", "one two three four five six seven"] });
        assert_eq!(prompt_tokens(&batch).unwrap(), text_tokens("one two three four five six seven"));
        assert_eq!(sequences(&batch), 2);
        assert_eq!(prompt_tokens(&serde_json::json!({ "prompt": [[1, 2, 3], [4, 5]] })).unwrap(), 3);
        assert_eq!(prompt_tokens(&serde_json::json!({ "prompt": [7, 8, 9, 10] })).unwrap(), 4);
        let chat = serde_json::json!({ "messages": [
            { "role": "user", "content": "What is the weather in Paris?" },
            { "role": "assistant", "content": null, "tool_calls": [
                { "id": "c1", "type": "function", "function": { "name": "get_weather", "arguments": "{\"city\":\"Paris\"}" } }
            ] },
            { "role": "tool", "tool_call_id": "c1", "content": "18 C, sunny" },
            { "role": "user", "content": [
                { "type": "text", "text": "And this?" },
                { "type": "image_url", "image_url": { "url": "data:image/png;base64,AAAA" } }
            ] }
        ] });
        let n = prompt_tokens(&chat).unwrap();
        assert!(n > IMAGE_TOKENS + 4 * MESSAGE_OVERHEAD_TOKENS, "{n}");
        let with_tools = serde_json::json!({ "messages": chat["messages"], "tools": [
            { "type": "function", "function": { "name": "get_weather", "parameters": { "type": "object" } } }
        ] });
        assert!(prompt_tokens(&with_tools).unwrap() > n);
        assert!(prompt_tokens(&serde_json::json!({ "model": "m" })).is_err());
        assert!(prompt_tokens(&serde_json::json!({ "prompt": {} })).is_err());
    }

    /// A huge prompt is counted from its first MiB and scaled: bounded work.
    #[test]
    fn a_huge_prompt_is_counted_in_bounded_work() {
        let text = "hello ".repeat(400_000);
        let n = text_tokens(&text);
        assert!((380_000..=420_000).contains(&n), "{n}");
    }

    /// The error object has OpenAI's fields and a type that follows the status.
    #[tokio::test]
    async fn errors_have_openai_types() {
        for (status, kind) in [
            (400, "invalid_request_error"),
            (401, "authentication_error"),
            (429, "rate_limit_error"),
            (502, "server_error"),
            (503, "service_unavailable_error"),
        ] {
            let r = error(StatusCode::from_u16(status).unwrap(), "why");
            assert_eq!(r.status().as_u16(), status);
            let body = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["error"]["type"], kind, "{v}");
            assert_eq!(v["error"]["message"], "why");
            assert_eq!(v["error"]["code"], status);
            assert!(v["error"].as_object().unwrap().contains_key("param"));
        }
    }
}
