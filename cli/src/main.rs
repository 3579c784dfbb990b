//! `mdi`: run a model split into stages. For now: generate text on one node with the CPU
//! oracle, and fetch the default model.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use mdi::generate::{generate, Request};
use mdi_core::{Oracle, SamplingParams, StageSpec, StageWeights};

#[derive(Parser)]
#[command(
    name = "mdi",
    version,
    about = "Run a language model split across a ring of devices"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt or a chat message.
    Generate(GenerateArgs),
    /// Download the default model (SmolLM2-135M-Instruct, Q4_1) into the cache and print its path.
    Fetch,
}

#[derive(Clone, Copy, ValueEnum)]
enum Backend {
    /// The plain f32 CPU oracle.
    Cpu,
}

#[derive(Args)]
struct GenerateArgs {
    /// A GGUF file or a Hugging Face checkpoint folder [default: the cached default model].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Raw prompt text; special tokens such as <|im_start|> are parsed.
    #[arg(long, conflicts_with = "chat", required_unless_present = "chat")]
    prompt: Option<String>,
    /// One user message, wrapped in the model's chat template.
    #[arg(long)]
    chat: Option<String>,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 picks the most likely token every step (greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample among the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample among the most likely tokens holding this much probability.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value = "cpu")]
    backend: Backend,
    /// Print one JSON object with tokens, text and speeds after the text.
    #[arg(long)]
    json: bool,
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Fetch => {
            println!("{}", mdi::fetch::ensure_default_model()?.display());
            Ok(())
        }
        Command::Generate(args) => run_generate(args),
    }
}

fn run_generate(args: GenerateArgs) -> Result<()> {
    if !(args.temperature >= 0.0 && (0.0..=1.0).contains(&args.top_p)) {
        bail!("--temperature must be ≥ 0 and --top-p within 0..=1");
    }
    let path = match args.model {
        Some(p) => p,
        None => mdi::fetch::ensure_default_model()?,
    };
    let model = mdi::open_model(&path)?;
    let tok = &model.tokenizer;
    let prompt_tokens = match (&args.prompt, &args.chat) {
        (Some(p), _) => tok.encode(p, true)?,
        (None, Some(c)) => tok.encode(&tok.chat_prompt(c)?, false)?,
        (None, None) => bail!("give --prompt or --chat"),
    };
    let spec = StageSpec::whole(&model.config);
    let mut engine = match args.backend {
        Backend::Cpu => {
            let weights = StageWeights::load(model.store.as_ref(), &model.config, &spec)
                .with_context(|| format!("loading {}", path.display()))?;
            Oracle::new(model.config.clone(), weights)?
        }
    };
    let req = Request {
        prompt_tokens,
        max_tokens: args.max_tokens,
        params: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
        eos_ids: model.config.eos_ids.clone(),
        context: model.config.context,
    };

    // Stream text: decode everything generated so far and print what is new, holding back
    // while the tail is an incomplete UTF-8 sequence.
    let mut ids = Vec::new();
    let mut printed = 0;
    let mut stdout = std::io::stdout();
    let gen = generate(&mut engine, &req, |t| {
        ids.push(t);
        let text = tok.decode(&ids)?;
        if !text.ends_with('\u{FFFD}') && text.len() > printed && text.is_char_boundary(printed) {
            stdout.write_all(&text.as_bytes()[printed..])?;
            stdout.flush()?;
            printed = text.len();
        }
        Ok(())
    })?;
    let text = tok.decode(&gen.tokens)?;
    if text.len() > printed && text.is_char_boundary(printed) {
        stdout.write_all(&text.as_bytes()[printed..])?;
    }
    writeln!(stdout)?;
    if gen.hit_context {
        eprintln!(
            "note: stopped at the model's context of {} positions",
            req.context
        );
    }
    if args.json {
        let json = serde_json::json!({
            "prompt_tokens": req.prompt_tokens,
            "tokens": gen.tokens,
            "text": text,
            "prefill_tok_s": gen.prefill_tok_s(req.prompt_tokens.len()),
            "decode_tok_s": gen.decode_tok_s(),
        });
        writeln!(stdout, "{json}")?;
    }
    Ok(())
}
