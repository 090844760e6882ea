//! An engine on a thread of its own, fed by a channel: what `engine serve`
//! runs. The thread owns the model and the engine; an [`EngineHandle`]
//! sends it requests and adapter changes from any thread.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::infer::engine::{Engine, EngineConfig, Event, Request};
use crate::infer::metrics::Metrics;
use crate::model::llama::Llama;
use crate::model::lora::LoraAdapter;
use std::sync::mpsc;
use std::sync::Arc;

/// What an engine thread is asked to do.
pub enum Command {
    /// Run a request; its events go to the sink.
    Submit {
        request: Request,
        sink: Box<dyn FnMut(Event) -> bool + Send>,
    },
    LoadAdapter {
        name: String,
        adapter: Box<LoraAdapter>,
        done: mpsc::Sender<Result<()>>,
    },
    UnloadAdapter {
        name: String,
        done: mpsc::Sender<Result<()>>,
    },
}

/// The sending end of a running engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    pub metrics: Arc<Metrics>,
    /// The longest a sequence may be (prompt and generated tokens).
    pub max_len: usize,
}

impl EngineHandle {
    /// Queues a request. Errors only when the engine thread has stopped.
    pub fn submit(
        &self,
        request: Request,
        sink: Box<dyn FnMut(Event) -> bool + Send>,
    ) -> Result<()> {
        self.send(Command::Submit { request, sink })
    }

    /// Loads an adapter under `name` and waits until it is in place.
    pub fn load_adapter(&self, name: &str, adapter: LoraAdapter) -> Result<()> {
        let (done, rx) = mpsc::channel();
        self.send(Command::LoadAdapter {
            name: name.to_string(),
            adapter: Box::new(adapter),
            done,
        })?;
        rx.recv().map_err(|_| stopped())?
    }

    pub fn unload_adapter(&self, name: &str) -> Result<()> {
        let (done, rx) = mpsc::channel();
        self.send(Command::UnloadAdapter {
            name: name.to_string(),
            done,
        })?;
        rx.recv().map_err(|_| stopped())?
    }

    fn send(&self, c: Command) -> Result<()> {
        self.tx.send(c).map_err(|_| stopped())
    }
}

fn stopped() -> Error {
    Error::Invalid("the inference engine has stopped".into())
}

/// Starts an engine on a thread of its own (a worker of the rayon pool, so
/// the ops' parallel loops start where they are called), owning `model`.
/// It runs while any handle lives or any request is unfinished.
pub fn spawn<B: Backend + 'static>(model: Llama<B>, cfg: EngineConfig) -> Result<EngineHandle> {
    let (tx, rx) = mpsc::channel::<Command>();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<usize>>();
    let metrics = Arc::new(Metrics::default());
    let m = metrics.clone();
    std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || rayon::scope(|_| run(&model, cfg, m, rx, ready_tx)))
        .map_err(|e| Error::Invalid(format!("cannot start the engine thread: {e}")))?;
    let max_len = ready_rx
        .recv()
        .map_err(|_| Error::Invalid("the engine thread died while starting".into()))??;
    Ok(EngineHandle {
        tx,
        metrics,
        max_len,
    })
}

fn run<B: Backend>(
    model: &Llama<B>,
    cfg: EngineConfig,
    metrics: Arc<Metrics>,
    rx: mpsc::Receiver<Command>,
    ready: mpsc::Sender<Result<usize>>,
) {
    let mut engine = match Engine::new(model, cfg, metrics) {
        Ok(e) => {
            let _ = ready.send(Ok(e.max_len()));
            e
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut open = true;
    loop {
        // Block for work when idle; otherwise take what has arrived.
        if engine.is_idle() {
            if !open {
                return;
            }
            match rx.recv() {
                Ok(c) => engine.command(c),
                Err(_) => return,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(c) => engine.command(c),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        if let Err(e) = engine.step() {
            engine.fail_all(&e.to_string());
        }
    }
}

impl<B: Backend> Engine<'_, B> {
    fn command(&mut self, c: Command) {
        match c {
            Command::Submit { request, sink } => self.submit(request, sink),
            Command::LoadAdapter {
                name,
                adapter,
                done,
            } => {
                let _ = done.send(self.load_adapter(&name, &adapter));
            }
            Command::UnloadAdapter { name, done } => {
                let _ = done.send(self.unload_adapter(&name));
            }
        }
    }
}
