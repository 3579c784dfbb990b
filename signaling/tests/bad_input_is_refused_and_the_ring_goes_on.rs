//! Bad input to the server gets a clear error and the ring goes on: a wrong or missing token
//! (401 in OpenAI's error JSON; a refused join on the WebSocket), malformed and oversized
//! bodies, an unknown model, a prompt longer than the context, a Range past the end of the
//! model file (416), garbage on the WebSocket, and a client that disconnects mid-stream (its
//! sequence is cancelled on every node and its KV cache freed). A correct request afterwards
//! still succeeds, and a node stopped with SIGTERM leaves the room at once.

use std::time::Duration;

use anyhow::{Context, Result};
use mdi_tests::procs::{self, http};
use serde_json::{json, Value};
use tungstenite::Message;

const TOKEN: &str = "t0ken";

fn error_of(resp: reqwest::blocking::Response) -> Result<(u16, Value)> {
    let status = resp.status().as_u16();
    let v: Value = resp.json().context("an error body in JSON")?;
    assert!(
        v["error"]["message"].is_string(),
        "OpenAI-shaped error: {v}"
    );
    Ok((status, v))
}

fn ws_reply(url: &str, first: Message) -> Result<String> {
    let ws_url = url.replacen("http://", "ws://", 1) + "/ws";
    let (mut ws, _) = tungstenite::connect(ws_url.as_str())?;
    ws.send(first)?;
    loop {
        match ws.read()? {
            Message::Text(t) => return Ok(t.to_string()),
            Message::Close(_) => return Ok("closed".into()),
            _ => continue,
        }
    }
}

#[test]
fn bad_input_is_refused_and_the_ring_goes_on() -> Result<()> {
    if !procs::isolated("bad_input_is_refused_and_the_ring_goes_on") {
        return Ok(());
    }
    let model = mdi_tests::default_model()?;
    let path = model.path.to_string_lossy().to_string();
    let server = procs::start_server(
        env!("CARGO_BIN_EXE_signaling").as_ref(),
        &["--model", &path, "--token", TOKEN, "--min-nodes", "2"],
    )?;
    let url = server.url.clone();
    let mdi = procs::binary("mdi");
    let args = [
        "--token",
        TOKEN,
        "--backend",
        "oracle",
        "--memory-budget",
        "2G",
    ];
    let _a = procs::start_node(&mdi, &url, "a", &args)?;
    let mut b = procs::start_node(&mdi, &url, "b", &args)?;
    procs::wait_ready(&url, 2, Duration::from_secs(240))?;
    let c = http();
    let endpoint = format!("{url}/v1/chat/completions");
    let good = json!({"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4});

    // Tokens.
    let (s, v) = error_of(c.post(&endpoint).json(&good).send()?)?;
    assert_eq!(s, 401, "{v}");
    let (s, _) = error_of(c.post(&endpoint).bearer_auth("nope").json(&good).send()?)?;
    assert_eq!(s, 401);
    let (s, _) = error_of(c.get(format!("{url}/model/manifest")).send()?)?;
    assert_eq!(s, 401);
    let join = |token: &str| {
        json!({"type": "join", "room": "default", "token": token, "name": "intruder",
               "kind": "native", "profile": {"memory_budget": 1, "backend": "cpu",
               "adapter": "x", "speed": 1.0, "weight_factor": 1.0}})
        .to_string()
    };
    let r = ws_reply(&url, Message::text(join("wrong")))?;
    assert!(r.contains("refused") && r.contains("token"), "{r}");

    // Garbage on the WebSocket, before and as the join; oversized frames.
    let r = ws_reply(&url, Message::text("{not json"))?;
    assert!(r.contains("refused") && r.contains("malformed"), "{r}");
    let r = ws_reply(&url, Message::binary(vec![1, 2, 3]))?;
    assert!(r.contains("refused"), "{r}");
    let big = format!("{{\"type\":\"join\",\"pad\":\"{}\"}}", "x".repeat(2 << 20));
    let r = ws_reply(&url, Message::text(big));
    assert!(r.as_ref().map_or(true, |s| s == "closed"), "{r:?}");

    // Malformed, oversized and impossible requests.
    let send_raw = |body: Vec<u8>| {
        c.post(&endpoint)
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let (s, v) = error_of(send_raw(b"{\"messages\": [".to_vec())?)?;
    assert_eq!(s, 400, "{v}");
    // The answer to an oversized body reaches the client every time (the server reads the
    // rest before it answers, so no reset overtakes the 413), with or without a token.
    for _ in 0..4 {
        let (s, v) = error_of(send_raw(vec![b' '; 2 << 20])?)?;
        assert_eq!(s, 413, "{v}");
    }
    let (s, v) = error_of(c.post(&endpoint).body(vec![b' '; 2 << 20]).send()?)?;
    assert_eq!(s, 401, "{v}");
    let (s, v) = error_of(send_raw(b"{\"messages\": []}".to_vec())?)?;
    assert_eq!(s, 400, "{v}");
    let (s, v) = error_of(
        c.post(&endpoint)
            .bearer_auth(TOKEN)
            .json(&json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}))
            .send()?,
    )?;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    let long = "word ".repeat(9000);
    let (s, v) = error_of(
        c.post(&endpoint)
            .bearer_auth(TOKEN)
            .json(&json!({"messages": [{"role": "user", "content": long}]}))
            .send()?,
    )?;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("context_length_exceeded")),
        "{v}"
    );

    // Ranges.
    let file_len = std::fs::metadata(&model.path)?.len();
    let past = c
        .get(format!("{url}/model/file/0"))
        .bearer_auth(TOKEN)
        .header("range", format!("bytes={file_len}-"))
        .send()?;
    assert_eq!(past.status(), 416);
    assert_eq!(
        past.headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok()),
        Some(format!("bytes */{file_len}").as_str())
    );
    let part = c
        .get(format!("{url}/model/file/0"))
        .bearer_auth(TOKEN)
        .header("range", "bytes=0-3")
        .send()?;
    assert_eq!(part.status(), 206);
    assert_eq!(
        part.headers()
            .get("accept-ranges")
            .and_then(|v| v.to_str().ok()),
        Some("bytes")
    );
    assert!(part.headers().get("etag").is_some());
    assert_eq!(&part.bytes()?[..], b"GGUF");

    // A client that goes away mid-stream: the sequence ends everywhere, its KV is freed.
    {
        let mut resp = c
            .post(&endpoint)
            .bearer_auth(TOKEN)
            .json(
                &json!({"messages": [{"role": "user", "content": "Tell me a long story."}],
                          "max_tokens": 400, "stream": true, "temperature": 0}),
            )
            .send()?;
        assert_eq!(resp.status(), 200);
        let mut buf = [0u8; 512];
        let n = std::io::Read::read(&mut resp, &mut buf)?;
        assert!(n > 0, "the stream started");
        procs::wait_ring(
            &url,
            Duration::from_secs(30),
            "the sequence is running",
            |r| {
                r["nodes"]
                    .as_array()
                    .is_some_and(|ns| ns.iter().any(|n| n["kv_bytes"].as_u64() > Some(0)))
            },
        )?;
    }
    procs::wait_ring(
        &url,
        Duration::from_secs(30),
        "the dropped sequence is freed",
        |r| {
            r["sequences"]["requests_active"] == 0
                && r["sequences"]["in_flight"] == 0
                && r["nodes"]
                    .as_array()
                    .is_some_and(|ns| ns.iter().all(|n| n["kv_bytes"] == 0))
        },
    )?;

    // A correct request afterwards still succeeds.
    let ok = c.post(&endpoint).bearer_auth(TOKEN).json(&good).send()?;
    assert_eq!(ok.status(), 200);
    let v: Value = ok.json()?;
    assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");

    // SIGTERM: the node leaves the room cleanly and at once (not by heartbeat timeout).
    assert!(
        b.terminate(Duration::from_secs(10)),
        "node b exits 0 on SIGTERM"
    );
    procs::wait_ring(&url, Duration::from_secs(2), "node b left", |r| {
        r["nodes"].as_array().is_some_and(|ns| ns.len() == 1)
    })?;
    Ok(())
}
