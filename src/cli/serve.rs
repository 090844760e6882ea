//! `engine serve`: OpenAI's API over continuous-batched inference.

use crate::cli::common::{weights, folder, model_path, open_device, Device, DeviceArg};
use engine::model::quant_types::Weights;
use anyhow::{bail, Context, Result};
use engine::backend::cpu::Cpu;
use engine::backend::cuda::Cuda;
use engine::backend::Backend;
use engine::infer::engine::EngineConfig;
use engine::infer::thread::spawn;
use engine::infer::generate::BLOCK_SIZE;
use engine::model::llama::Llama;
use engine::model::bert::Embedder;
use engine::serve::rag::Rag;
use engine::serve::{adapters, router, AppState};
use engine::tokenizer::Tokenizer;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(clap::Args)]
pub struct Args {
    /// Model folder (config.json, *.safetensors, tokenizer.json), or a
    /// llama GGUF file, run with its matrices in their own formats.
    #[arg(long, value_name = "DIR|FILE.gguf")]
    model: PathBuf,
    /// The format of a model folder's matrices once loaded: f32, bf16, or
    /// quantized as llama-quantize would (q8_0, q4_0, q4_1, q4_k, q6_k).
    #[arg(long, value_name = "FORMAT", default_value = "f32", value_parser = weights)]
    weights: Weights,
    /// The name clients give as `model` (default: the folder's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Address to listen on; 0.0.0.0 listens on every interface.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on every /v1 request.
    #[arg(long, env = "ENGINE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Memory for the KV cache, in MiB: it bounds the tokens of all running
    /// requests together.
    #[arg(long, default_value_t = 1024)]
    kv_cache_mib: usize,
    /// Most tokens computed in one step (decode tokens and prompt chunks).
    #[arg(long, default_value_t = 512)]
    max_batch_tokens: usize,
    /// Most requests running at once.
    #[arg(long, default_value_t = 64)]
    max_seqs: usize,
    /// Most requests waiting for a place; past them a request gets 429.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// A LoRA adapter (PEFT folder) to serve as NAME: requests give NAME as
    /// their `model`. Repeatable.
    #[arg(long = "adapter", value_name = "NAME=DIR", value_parser = named_dir)]
    adapters: Vec<(String, PathBuf)>,
    /// A folder of adapter folders that `POST /v1/adapters {"name"}` loads
    /// from while serving (e.g. the --out folders of `engine finetune`).
    #[arg(long, value_name = "DIR")]
    adapter_dir: Option<PathBuf>,
    /// A RAG index folder (`engine index add` makes one; POST /v1/documents
    /// starts one): chat requests with `"retrieval": {"k": 3}` answer from
    /// its passages. Needs --embedder.
    #[arg(long, value_name = "DIR", requires = "embedder")]
    index: Option<PathBuf>,
    /// The sentence embedder of the index (models/all-minilm-l6-v2); also
    /// serves POST /v1/embeddings under its folder's name.
    #[arg(long, value_name = "DIR", requires = "index")]
    embedder: Option<PathBuf>,
    /// Where the model runs [default: auto].
    #[arg(long, value_enum)]
    device: Option<DeviceArg>,
}

pub fn run(args: Args) -> Result<()> {
    model_path(&args.model)?;
    if args.max_batch_tokens == 0 || args.max_seqs == 0 {
        bail!("--max-batch-tokens and --max-seqs must be at least 1");
    }
    if let Some(dir) = &args.adapter_dir {
        folder("adapter", dir)?;
    }
    let tokenizer = Tokenizer::load(&args.model)?;
    match open_device(args.device)? {
        Device::Cpu => serve(Cpu, &args, tokenizer),
        Device::Cuda(gpu) => serve(Cuda::new(gpu), &args, tokenizer),
        #[cfg(feature = "emu")]
        Device::Emu => serve(
            Cuda::new(engine::backend::cuda::driver::Emu::new()),
            &args,
            tokenizer,
        ),
    }
}

fn serve<B: Backend + 'static>(be: B, args: &Args, tokenizer: Tokenizer) -> Result<()> {
    let device = be.name();
    let model = Llama::load_as(be, &args.model, args.weights)?;
    let num_blocks = EngineConfig::blocks_in_mib(&model, BLOCK_SIZE, args.kv_cache_mib);
    if num_blocks == 0 {
        bail!(
            "--kv-cache-mib {} holds no KV block of this model",
            args.kv_cache_mib
        );
    }
    let stop_ids = tokenizer.stop_ids(&model.config.eos_token_ids);
    let model_config = model.config.clone();
    let name = match &args.served_model_name {
        Some(n) => n.clone(),
        None => engine::model::folder::name(&args.model),
    };
    let cfg = EngineConfig {
        max_batch_tokens: args.max_batch_tokens,
        max_seqs: args.max_seqs,
        block_size: BLOCK_SIZE,
        num_blocks,
    };
    let rag = match (&args.index, &args.embedder) {
        (Some(index), Some(embedder)) => {
            folder("embedder", embedder)?;
            let e = Embedder::load(embedder, Cpu)?;
            Some(Arc::new(Rag::open(e, engine::model::folder::name(embedder), index.clone())?))
        }
        _ => None,
    };
    let index_line = match &rag {
        Some(r) => format!("{} ({} chunks, embedder {})", r.index_dir.display(), r.len(), r.name),
        None => "none".to_string(),
    };
    let engine = spawn(model, cfg)?;
    let state = Arc::new(AppState {
        engine,
        tokenizer: Arc::new(tokenizer),
        model_name: name.clone(),
        stop_ids,
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        permits: Arc::new(tokio::sync::Semaphore::new(args.max_seqs + args.max_queue)),
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        model_config,
        adapters: Default::default(),
        adapter_dir: args.adapter_dir.clone(),
        rag,
    });
    for (name, dir) in &args.adapters {
        adapters::check_name(name, &state.model_name).map_err(|e| anyhow::anyhow!(e.message))?;
        folder("adapter", dir)?;
        adapters::load(&state, name, dir).with_context(|| format!("--adapter {name}={}", dir.display()))?;
    }
    let adapter_list = match state.adapters.lock().unwrap().iter().cloned().collect::<Vec<_>>() {
        v if v.is_empty() => "none".to_string(),
        v => v.join(", "),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let addr = std::net::SocketAddr::new(args.host, args.port);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let addr = listener.local_addr()?;
        eprintln!(
            "engine serve: http://{addr} · device {device} · model {name} · adapters: {adapter_list}{} · \
             index: {index_line} · KV cache {num_blocks} blocks of {BLOCK_SIZE} tokens ({} MiB){}",
            match &args.adapter_dir {
                Some(d) => format!(" (more from {})", d.display()),
                None => String::new(),
            },
            args.kv_cache_mib,
            if state.api_key.is_some() { " · API key required" } else { "" },
        );
        axum::serve(listener, router(state))
            .with_graceful_shutdown(shutdown())
            .await
            .context("the server failed")
    })?;
    eprintln!("engine serve: stopped");
    Ok(())
}

/// `NAME=DIR` of `--adapter`.
fn named_dir(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, dir)) if !name.is_empty() && !dir.is_empty() => {
            Ok((name.to_string(), PathBuf::from(dir)))
        }
        _ => Err(format!("expected NAME=DIR, got {s:?}")),
    }
}

/// Resolves at SIGTERM or Ctrl-C: the server stops accepting, lets the
/// requests in flight finish, and returns.
async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("engine serve: shutting down (finishing the requests in flight)");
}
