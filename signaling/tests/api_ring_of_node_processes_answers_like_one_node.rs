//! `signaling` and three `mdi node` processes linked by WebRTC on loopback, inside a network
//! namespace of the test's own: chat completions through the OpenAI-compatible API — plain and
//! streamed, one client and eight at once, and through the official `openai` Python client —
//! equal the single-node greedy answer for the same messages; several sequences were in flight
//! at once; and each node downloaded exactly the byte ranges of its own layers (counted by the
//! server), not the file.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use mdi_core::manifest::Manifest;
use mdi_core::weights::StageSpec;
use mdi_tests::procs::{self, http, sse_data};
use mdi_tests::rings::{chat_requests, single_node_all};
use serde_json::{json, Value};

const TOKEN: &str = "ring-secret";
const QUESTIONS: [&str; 8] = [
    "What is the capital of France?",
    "Name three colours.",
    "What is 7 times 8?",
    "Say hello in German.",
    "What is the largest planet?",
    "Name a fruit that is yellow.",
    "How many days are in a week?",
    "What do bees make?",
];
const MAX_TOKENS: usize = 10;

fn chat(url: &str, question: &str, stream: bool) -> Result<reqwest::blocking::Response> {
    Ok(http()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(TOKEN)
        .json(&json!({
            "model": "default",
            "messages": [{"role": "user", "content": question}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "stream": stream,
        }))
        .send()?)
}

fn plain_answer(url: &str, question: &str) -> Result<(String, Value)> {
    let resp = chat(url, question, false)?;
    ensure!(
        resp.status() == 200,
        "HTTP {}: {}",
        resp.status(),
        resp.text()?
    );
    let v: Value = resp.json()?;
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .context("content")?
        .to_string();
    Ok((text, v))
}

#[test]
fn three_node_processes_answer_like_one_node() -> Result<()> {
    if !procs::isolated("three_node_processes_answer_like_one_node") {
        return Ok(());
    }
    let model = mdi_tests::default_model()?;
    let reqs = chat_requests(model, &QUESTIONS, |_| MAX_TOKENS)?;
    let expected_tokens = single_node_all(model.store.as_ref(), &model.config, &reqs);
    let eos = &model.config.eos_ids;
    let expected: Vec<String> = expected_tokens
        .iter()
        .map(|t| {
            let ids: Vec<u32> = t.iter().copied().filter(|x| !eos.contains(x)).collect();
            model.tokenizer.decode_text(&ids)
        })
        .collect::<mdi_core::Result<_>>()?;
    assert_eq!(expected[0], "The capital of France is Paris.");

    let path = model.path.to_string_lossy().to_string();
    let server = procs::start_server(
        env!("CARGO_BIN_EXE_signaling").as_ref(),
        // f32 activations: the ring computes exactly what one node does, so greedy answers
        // match token for token (f16 could flip a near tie).
        &[
            "--model",
            &path,
            "--token",
            TOKEN,
            "--min-nodes",
            "3",
            "--in-flight",
            "8",
            "--wire",
            "f32",
        ],
    )?;
    let url = server.url.clone();
    let mdi = procs::binary("mdi");
    let _nodes: Vec<_> = (1..=3)
        .map(|i| {
            procs::start_node(
                &mdi,
                &url,
                &format!("node-{i}"),
                &[
                    "--token",
                    TOKEN,
                    "--backend",
                    "oracle",
                    "--memory-budget",
                    "2G",
                ],
            )
        })
        .collect::<Result<_>>()?;
    let ring = procs::wait_ready(&url, 3, Duration::from_secs(240))?;

    // One client, not streamed.
    let (text, v) = plain_answer(&url, QUESTIONS[0])?;
    assert_eq!(text, expected[0]);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], reqs[0].prompt_tokens.len());
    assert_eq!(v["usage"]["completion_tokens"], expected_tokens[0].len());

    // Streamed: role first, content deltas, a final chunk with finish_reason, then [DONE].
    let resp = chat(&url, QUESTIONS[1], true)?;
    assert_eq!(resp.status(), 200);
    assert!(resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream")));
    let data = sse_data(&resp.text()?);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d))
        .collect::<std::result::Result<_, _>>()?;
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, expected[1]);
    let last = chunks.last().context("chunks")?;
    assert!(last["choices"][0]["finish_reason"].is_string(), "{last}");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));

    // Eight clients at once each get exactly their own answer.
    let answers: Vec<Result<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = QUESTIONS
            .iter()
            .map(|q| {
                let url = url.clone();
                s.spawn(move || plain_answer(&url, q).map(|(t, _)| t))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("client panicked")))
            })
            .collect()
    });
    for (i, a) in answers.into_iter().enumerate() {
        assert_eq!(a?, expected[i], "client {i}");
    }
    let after = procs::wait_ring(&url, Duration::from_secs(10), "stats reported", |r| {
        r["sequences"]["peak_in_flight"].as_u64().unwrap_or(0) > 1
    })?;
    eprintln!("ring after 8 clients: {}", after["sequences"]);

    // The official openai client, plain and streamed.
    let script = format!(
        r#"
import json, openai
c = openai.OpenAI(base_url="{url}/v1", api_key="{TOKEN}")
ids = [m.id for m in c.models.list().data]
r = c.chat.completions.create(model="default", temperature=0, max_tokens={MAX_TOKENS},
    messages=[{{"role": "user", "content": {q0}}}])
s = c.chat.completions.create(model=ids[0], temperature=0, max_tokens={MAX_TOKENS}, stream=True,
    messages=[{{"role": "user", "content": {q2}}}])
streamed = "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)
print(json.dumps({{"ids": ids, "plain": r.choices[0].message.content,
    "finish": r.choices[0].finish_reason, "streamed": streamed,
    "usage": r.usage.completion_tokens}}))
"#,
        q0 = serde_json::to_string(QUESTIONS[0])?,
        q2 = serde_json::to_string(QUESTIONS[2])?,
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .context("running python3")?;
    ensure!(
        out.status.success(),
        "the openai client failed (scripts/setup.sh installs it with pip): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let py: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(
        py["ids"][0],
        model
            .path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("")
    );
    assert_eq!(py["plain"], expected[0]);
    assert_eq!(py["finish"], "stop");
    assert_eq!(py["streamed"], expected[2]);

    // Each node fetched exactly its own layers' bytes, as the server counted them.
    let manifest: Manifest = http()
        .get(format!("{url}/model/manifest"))
        .bearer_auth(TOKEN)
        .send()?
        .error_for_status()?
        .json()?;
    let file_len = std::fs::metadata(&model.path)?.len();
    let mut covered = 0;
    let mut total = 0;
    for n in ring["nodes"].as_array().context("nodes")? {
        let layers = [
            n["layers"][0].as_u64().context("layers")? as usize,
            n["layers"][1].as_u64().context("layers")? as usize,
        ];
        let starter = n["role"] == "starter";
        let spec = StageSpec {
            layers: layers[0]..layers[1],
            embed: starter,
            head: starter,
        };
        let want = manifest.stage_bytes(&spec)?;
        let got = n["downloaded_bytes"].as_u64().context("downloaded_bytes")?;
        assert_eq!(
            got, want,
            "node {} ({layers:?}) downloaded {got}, its share is {want}",
            n["name"]
        );
        // Shares follow the nodes' measured speeds, which differ when nodes time themselves
        // at once on the same cores: the starter (head and embedding, 30 MB) can hold half.
        assert!(
            got < file_len * 3 / 4,
            "no node fetched (nearly) the whole file: {got} of {file_len}"
        );
        assert!(n["rss_bytes"].as_u64().unwrap_or(0) > 0, "RSS is measured");
        assert!(
            n["wasm_memory_bytes"].is_null(),
            "a process has no wasm memory"
        );
        assert!(
            n["weight_bytes"].as_u64().unwrap_or(0) > 0,
            "weights are reported"
        );
        covered += layers[1] - layers[0];
        total += got;
    }
    assert_eq!(
        covered, model.config.n_layers,
        "the layers are shared out once"
    );
    assert!(
        total < file_len,
        "together they fetched less than the file: {total} of {file_len}"
    );
    Ok(())
}
