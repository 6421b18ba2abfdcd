//! The optional MLLM planner: any OpenAI-compatible chat endpoint (vLLM, llama.cpp server, ...)
//! serving a vision model reads the image and the built-in statistics and answers with a plan
//! line.
//!
//! [`OpenAiPlanner::plan`] sends a FAPE-IR-style prompt with the image as a base64 PNG data
//! URL, parses and validates the first line of the reply that holds `Task:`, and checks it
//! against the statistics ([`rules::contradiction`]). An invalid or contradicting answer is
//! sent back once with the reason; if the second answer fails too, or the endpoint is
//! unreachable, slow or misbehaving, the built-in planner's plan is returned with a warning
//! saying why ([`Planned::warning`]). Only an invalid image is an error.
//!
//! Bounds: each request may take [`OpenAiPlanner::timeout`] from connecting to the last byte of
//! the reply (a server that never answers, or drips its reply a byte at a time, is given up on
//! then), a reply may be at most [`MAX_REPLY_BYTES`], and at most two requests are made, so
//! [`OpenAiPlanner::plan`] returns within about twice the timeout, holding at most 4 MiB of reply.
//! Invalid UTF-8, a body that is not JSON or not a chat completion, and any status but 200 are
//! misbehaviour like the rest: a warning and the built-in plan.
//!
//! Transport: plain HTTP/1.1 over `std::net::TcpStream` (no TLS, no new dependency): an
//! `http://host[:port][/path]` endpoint, typically a local server; `https://` endpoints are
//! refused (put a local TLS-terminating proxy in front). The request goes to
//! `<endpoint>/chat/completions` unless the endpoint already ends with that path.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::{plan, rules, Plan, PlanLine, Statistics};
use crate::error::Result;
use crate::pipeline::image::Image;

/// What the model is told it is and must answer.
pub const SYSTEM_PROMPT: &str = "You are the planner of FAPE-IR, an all-in-one image restoration model. \
Look at the degraded image and its pixel statistics, decide the single dominant degradation, and answer \
with exactly one line in this format: Task: <deraining|desnowing|dehazing|deblurring|low_light_enhancement|\
denoising|super_resolution>, Focus: <high|low>, Rationale: <brief, citing the statistics>, Pipeline: \
<step -> step>. Rain, snow, blur, noise and super-resolution restore high frequencies (Focus: high); \
haze and low light restore low frequencies (Focus: low). An input under 512 px on both sides is \
super_resolution.";

/// An OpenAI-compatible chat endpoint and the model to ask.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenAiPlanner {
    /// `http://host[:port][/path]`, e.g. `http://127.0.0.1:8000/v1`.
    pub endpoint: String,
    /// The `model` field of the request.
    pub model: String,
    /// Limit on each request, from connecting to the last byte of the reply (so a server that
    /// never answers or drips its reply costs at most this per request, two requests at most).
    pub timeout: Duration,
}

/// A plan and, when the model's answer was not used, why.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    /// The model's plan, or the built-in planner's when [`Planned::warning`] is set.
    pub plan: Plan,
    /// Why the built-in plan was used instead of the model's.
    pub warning: Option<String>,
    /// Requests made (0 when the endpoint was never reached, 2 after a retry).
    pub requests: usize,
}

/// The target of an `http://` endpoint.
#[derive(Debug, Clone, PartialEq)]
struct HttpTarget {
    /// `host:port` to connect to.
    authority: String,
    /// `host[:port]` for the `Host` header.
    host_header: String,
    /// Absolute path of the chat completions resource.
    path: String,
}

fn parse_endpoint(endpoint: &str) -> std::result::Result<HttpTarget, String> {
    if endpoint.starts_with("https://") {
        return Err("https endpoints are not supported (plain http only; use a local TLS-terminating proxy)".into());
    }
    let rest = endpoint.strip_prefix("http://").ok_or_else(|| format!("endpoint `{endpoint}` is not http://..."))?;
    let (host_port, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    if host_port.is_empty() {
        return Err(format!("endpoint `{endpoint}` has no host"));
    }
    let authority = if host_port.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
        host_port.to_string()
    } else {
        format!("{host_port}:80")
    };
    let path = if path.ends_with("/chat/completions") { path.to_string() } else { format!("{path}/chat/completions") };
    Ok(HttpTarget { authority, host_header: host_port.to_string(), path })
}

/// Standard base64 (RFC 4648, padded).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * k)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The user message's text: the size and every statistic with the built-in rules' readings.
fn statistics_text(stats: &Statistics) -> String {
    let mut text = format!("Image size: {}x{} px.\nPixel statistics:\n", stats.width, stats.height);
    for (name, value) in stats.measured() {
        text.push_str(&format!("- {name}: {value:.5}\n"));
    }
    text.push_str("Readings of the built-in rules:\n");
    for e in rules::evidence(stats) {
        text.push_str(&format!("- {}: {}\n", e.task, e.reason));
    }
    text.push_str("Answer with the single plan line.");
    text
}

/// The largest reply read: 4 MiB (a plan line is a few hundred bytes; a reply with the JSON
/// around it a few KiB). A longer reply is cut off there and the built-in plan used.
pub const MAX_REPLY_BYTES: usize = 4 << 20;

/// Reads an HTTP/1.1 response to the end (the request asked the server to close) or until
/// `deadline`, keeping at most [`MAX_REPLY_BYTES`].
fn read_reply(stream: &mut TcpStream, deadline: Instant) -> std::result::Result<Vec<u8>, String> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 << 10];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no complete reply within the timeout ({} bytes came)", raw.len()));
        }
        stream.set_read_timeout(Some(left)).map_err(|e| format!("reading the reply failed: {e}"))?;
        let n = match stream.read(&mut buf) {
            Ok(0) => return Ok(raw),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Err(format!("no complete reply within the timeout ({} bytes came)", raw.len()));
            }
            Err(e) => return Err(format!("reading the reply failed: {e}")),
        };
        if raw.len() + n > MAX_REPLY_BYTES {
            return Err(format!("the reply is larger than {MAX_REPLY_BYTES} bytes"));
        }
        raw.extend_from_slice(&buf[..n]);
    }
}

/// The status code and body of a raw HTTP/1.1 response, de-chunked when the server chunked it.
fn parse_response(raw: &[u8]) -> std::result::Result<(u16, Vec<u8>), String> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or("the reply has no complete HTTP header")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let body = &raw[split + 4..];
    let mut lines = head.lines();
    let status = lines
        .next()
        .filter(|l| l.starts_with("HTTP/"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or("the reply has no HTTP status line")?;
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_ascii_lowercase())
        })
    };
    if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        return dechunk(body).map(|b| (status, b));
    }
    match header("content-length").map(|v| v.parse::<usize>()) {
        Some(Ok(n)) if body.len() < n => Err(format!("the reply is truncated ({} of {n} bytes)", body.len())),
        Some(Ok(n)) => Ok((status, body[..n].to_vec())),
        Some(Err(_)) => Err("the reply has an invalid Content-Length".into()),
        None => Ok((status, body.to_vec())),
    }
}

/// The payload of a chunked body.
fn dechunk(mut body: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n").ok_or("a chunk size line is truncated")?;
        let size_text = String::from_utf8_lossy(&body[..line_end]);
        let size_hex = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16).map_err(|_| format!("bad chunk size `{size_hex}`"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        // `size` comes from the server: compare without adding to it.
        if body.len() < 2 || body.len() - 2 < size {
            return Err(format!("a chunk of {size} bytes is truncated"));
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

/// The message content of a chat-completion body: `choices[0].message.content`.
fn reply_content(status: u16, body: &[u8]) -> std::result::Result<String, String> {
    if status != 200 {
        return Err(format!(
            "the endpoint answered HTTP {status}: {}",
            first_chars(&String::from_utf8_lossy(body), 160)
        ));
    }
    let json: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("the reply is not JSON: {e}"))?;
    json["choices"][0]["message"]["content"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| "the reply has no choices[0].message.content string".into())
}

/// The plan line in a raw HTTP reply of a chat endpoint, as [`OpenAiPlanner::plan`] reads one:
/// the status line and headers, a chunked or sized body, the JSON, its message content, and
/// the first `Task:` line of it, validated. The entry point of the `openai_reply` fuzz target.
///
/// # Errors
/// Why the reply is unusable, as the warning [`OpenAiPlanner::plan`] prints says it.
#[doc(hidden)]
pub fn reply_plan_line(raw: &[u8]) -> std::result::Result<PlanLine, String> {
    let (status, body) = parse_response(raw)?;
    plan_line_of(&reply_content(status, &body)?)
}

/// Writes all of `bytes` to `stream` before `deadline`.
fn write_all_by(stream: &mut TcpStream, mut bytes: &[u8], deadline: Instant) -> std::io::Result<()> {
    while !bytes.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the timeout passed"));
        }
        stream.set_write_timeout(Some(left))?;
        match stream.write(&bytes[..bytes.len().min(64 << 10)]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The first line of `content` holding `Task:`, from there on, without markdown decoration.
fn plan_line_of(content: &str) -> std::result::Result<PlanLine, String> {
    let line = content
        .lines()
        .find_map(|l| l.find("Task:").map(|i| &l[i..]))
        .ok_or_else(|| format!("the reply holds no `Task:` line: `{}`", first_chars(content, 120)))?;
    let line = line.trim().trim_end_matches(['`', '*', '"']).trim();
    PlanLine::parse(line).map_err(|e| format!("the reply's plan line is invalid ({e}): `{}`", first_chars(line, 160)))
}

fn first_chars(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

impl OpenAiPlanner {
    /// One chat completion: POSTs `messages` and returns the reply's message content.
    fn complete(&self, target: &HttpTarget, messages: &[serde_json::Value]) -> std::result::Result<String, String> {
        let body = serde_json::json!({
            "model": self.model,
            "messages": messages,
            "temperature": 0,
            "max_tokens": 300,
        })
        .to_string();
        let deadline = Instant::now() + self.timeout;
        let addr = target
            .authority
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {}: {e}", target.authority))?
            .next()
            .ok_or_else(|| format!("{} resolves to no address", target.authority))?;
        let mut stream = TcpStream::connect_timeout(&addr, self.timeout)
            .map_err(|e| format!("cannot connect to {}: {e}", target.authority))?;
        let request = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nAccept: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            target.path,
            target.host_header,
            body.len()
        );
        write_all_by(&mut stream, request.as_bytes(), deadline)
            .map_err(|e| format!("sending the request to {} failed: {e}", target.authority))?;
        let raw = read_reply(&mut stream, deadline)?;
        let (status, reply) = parse_response(&raw)?;
        reply_content(status, &reply)
    }

    /// Plans `image` with the model, falling back to the built-in planner as the module
    /// documentation says.
    ///
    /// # Errors
    /// Only the built-in planner's ([`plan`]): an image that breaks its invariants or holds a
    /// non-finite value. Endpoint failures are warnings, not errors.
    pub fn plan(&self, image: &Image) -> Result<Planned> {
        let builtin = plan(image)?;
        let fallback = |why: String, requests: usize| Planned {
            plan: builtin.clone(),
            warning: Some(format!("{why}; using the built-in planner")),
            requests,
        };
        let target = match parse_endpoint(&self.endpoint) {
            Ok(target) => target,
            Err(why) => return Ok(fallback(why, 0)),
        };
        let data_url = format!("data:image/png;base64,{}", base64(&image.encode_png()?));
        let mut messages = vec![
            serde_json::json!({"role": "system", "content": SYSTEM_PROMPT}),
            serde_json::json!({"role": "user", "content": [
                {"type": "text", "text": statistics_text(&builtin.stats)},
                {"type": "image_url", "image_url": {"url": data_url}},
            ]}),
        ];
        let mut problem = String::new();
        for attempt in 1..=2 {
            let content = match self.complete(&target, &messages) {
                Ok(content) => content,
                Err(why) => return Ok(fallback(why, attempt)),
            };
            problem = match plan_line_of(&content) {
                Ok(line) => match rules::contradiction(&builtin.stats, line.task) {
                    None => {
                        let planned = Plan::from_line(line, builtin.stats.clone());
                        return Ok(Planned { plan: planned, warning: None, requests: attempt });
                    }
                    Some(why) => format!("the plan `{line}` contradicts the statistics: {why}"),
                },
                Err(why) => why,
            };
            messages.push(serde_json::json!({"role": "assistant", "content": content}));
            messages.push(serde_json::json!({"role": "user", "content": format!(
                "{problem}. Reconsider and answer with one corrected plan line in the required format."
            )}));
        }
        Ok(fallback(format!("after asking again, {problem}"), 2))
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::sync::mpsc;
    use std::thread;

    use super::*;
    use crate::pipeline::planner::Task;

    /// A loopback server that answers each connection with the next of `replies` (raw HTTP
    /// text) and sends back every request body it read.
    fn stub(replies: Vec<String>) -> (String, mpsc::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}/v1", listener.local_addr().unwrap());
        let (send, receive) = mpsc::channel();
        thread::spawn(move || {
            for reply in replies {
                let (mut stream, _) = listener.accept().unwrap();
                let mut raw = Vec::new();
                let mut buf = [0u8; 65536];
                let body = loop {
                    let n = stream.read(&mut buf).unwrap();
                    raw.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&raw).into_owned();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length: usize = text
                            .lines()
                            .find_map(|l| l.strip_prefix("Content-Length: "))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if raw.len() >= end + 4 + length {
                            break text[..end].to_string() + "\n" + &text[end + 4..];
                        }
                    }
                    if n == 0 {
                        break text;
                    }
                };
                send.send(body).unwrap();
                stream.write_all(reply.as_bytes()).unwrap();
            }
        });
        (endpoint, receive)
    }

    fn ok_reply(content: &str) -> String {
        let body = serde_json::json!({"choices": [{"message": {"role": "assistant", "content": content}}]}).to_string();
        format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
    }

    fn planner(endpoint: String) -> OpenAiPlanner {
        OpenAiPlanner { endpoint, model: "stub-vl".into(), timeout: Duration::from_secs(5) }
    }

    /// A 96x64 image: super-resolution by the size rule, whatever the model says.
    fn small() -> Image {
        Image::from_fn(96, 64, |x, y| [x as f32 / 96.0, y as f32 / 64.0, 0.4])
    }

    const SR_LINE: &str = "Task: super_resolution, Focus: high, Rationale: tiny input, Pipeline: upsample -> sharpen";

    #[test]
    fn a_consistent_answer_is_used_and_the_request_carries_image_and_statistics() {
        let (endpoint, requests) = stub(vec![ok_reply(&format!("Sure.\n**{SR_LINE}**"))]);
        let planned = planner(endpoint).plan(&small()).unwrap();
        assert_eq!(planned.warning, None);
        assert_eq!(planned.requests, 1);
        assert_eq!(planned.plan.rationale, "tiny input");
        assert_eq!(planned.plan.pipeline, vec!["upsample", "sharpen"]);
        let request = requests.recv().unwrap();
        assert!(request.starts_with("POST /v1/chat/completions HTTP/1.1"), "{request}");
        for needle in ["\"model\":\"stub-vl\"", "data:image/png;base64,iVBORw0KGgo", "streak_strength", "96x64"] {
            assert!(request.contains(needle), "the request lacks {needle}");
        }
    }

    #[test]
    fn a_contradicting_answer_is_questioned_once() {
        let rain = "Task: deraining, Focus: high, Rationale: streaks, Pipeline: remove streaks";
        let (endpoint, requests) = stub(vec![ok_reply(rain), ok_reply(SR_LINE)]);
        let planned = planner(endpoint).plan(&small()).unwrap();
        assert_eq!((planned.warning.as_deref(), planned.requests), (None, 2));
        assert_eq!(planned.plan.task, Task::SuperResolution);
        let second = requests.iter().nth(1).unwrap();
        assert!(second.contains("contradicts the statistics") && second.contains("under 512 px"), "{second}");
    }

    #[test]
    fn misbehaving_endpoints_fall_back_with_a_warning() {
        let garbage = ok_reply("I think it is rainy.");
        let cases = [
            (vec![garbage.clone(), garbage], "no `Task:` line"),
            (vec!["HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\noops".to_string()], "HTTP 500"),
            (vec!["HTTP/1.1 200 OK\r\nContent-Length: 900\r\n\r\n{\"choices\"".to_string()], "truncated"),
            (vec!["HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".to_string()], "not JSON"),
            (vec![ok_reply("Task: dehazing, Focus: high, Rationale: r, Pipeline: a"); 2], "contradicts task"),
        ];
        for (replies, needle) in cases {
            let (endpoint, _requests) = stub(replies);
            let planned = planner(endpoint).plan(&small()).unwrap();
            let warning = planned.warning.unwrap_or_default();
            assert!(warning.contains(needle) && warning.ends_with("using the built-in planner"), "{needle}: {warning}");
            assert_eq!(planned.plan.task, Task::SuperResolution, "the built-in plan");
        }
        // Nothing listens on a port just released; https is refused before connecting.
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        for (endpoint, needle) in
            [(format!("http://127.0.0.1:{port}"), "cannot connect"), ("https://x/v1".into(), "https")]
        {
            let planned = planner(endpoint).plan(&small()).unwrap();
            assert!(planned.warning.unwrap_or_default().contains(needle), "{needle}");
        }
    }

    #[test]
    fn endpoints_base64_and_chunked_bodies() {
        let t = parse_endpoint("http://localhost:8080/v1/").unwrap();
        assert_eq!((t.authority.as_str(), t.path.as_str()), ("localhost:8080", "/v1/chat/completions"));
        let t = parse_endpoint("http://example.org/v1/chat/completions").unwrap();
        assert_eq!((t.authority.as_str(), t.path.as_str()), ("example.org:80", "/v1/chat/completions"));
        assert!(parse_endpoint("ftp://x").is_err() && parse_endpoint("http:///v1").is_err());
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(dechunk(b"4\r\nWiki\r\n5;x=1\r\npedia\r\n0\r\n\r\n").unwrap(), b"Wikipedia");
        assert!(dechunk(b"9\r\nWiki\r\n").is_err());
    }
}
