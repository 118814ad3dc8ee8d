//! Compiles on a dedicated thread with a large stack: the parser recurses deeply (over 100 KiB
//! of stack per nesting level in debug builds), and a stack overflow would abort the process.
//! The thread is started on first use and serves compiles one at a time.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{Sender, SyncSender, channel, sync_channel};
use std::sync::{Arc, Mutex};

use super::check::{self, Compiled};

/// The compiler thread's stack (reserved, not committed, until used).
const COMPILE_STACK: usize = 256 << 20;

struct Job {
    env: Arc<cel::Env>,
    src: String,
    reply: SyncSender<Result<Compiled, String>>,
}

static COMPILER: Mutex<Option<Sender<Job>>> = Mutex::new(None);

/// Parses and checks `src` on the compiler thread.
pub(super) fn compile(env: &Arc<cel::Env>, src: &str) -> Result<Compiled, String> {
    let (reply, result) = sync_channel(1);
    let mut job = Job {
        env: env.clone(),
        src: src.to_string(),
        reply,
    };
    // A thread that stopped is replaced, once per call.
    for _ in 0..2 {
        let sender = sender()?;
        match sender.send(job) {
            Ok(()) => {
                return result
                    .recv()
                    .map_err(|_| "the CEL compiler thread stopped".to_string())?;
            }
            Err(returned) => {
                job = returned.0;
                if let Ok(mut slot) = COMPILER.lock() {
                    *slot = None;
                }
            }
        }
    }
    Err("the CEL compiler thread is not available".to_string())
}

fn sender() -> Result<Sender<Job>, String> {
    let mut slot = COMPILER
        .lock()
        .map_err(|_| "the CEL compiler lock is poisoned".to_string())?;
    if let Some(sender) = slot.as_ref() {
        return Ok(sender.clone());
    }
    let (sender, jobs) = channel::<Job>();
    std::thread::Builder::new()
        .name("cel-compile".into())
        .stack_size(COMPILE_STACK)
        .spawn(move || {
            for job in jobs {
                let result = catch_unwind(AssertUnwindSafe(|| check::compile(&job.env, &job.src)))
                    .unwrap_or_else(|_| {
                        Err("internal error while compiling the expression".to_string())
                    });
                let _ = job.reply.send(result);
            }
        })
        .map_err(|e| format!("cannot start the CEL compiler thread: {e}"))?;
    *slot = Some(sender.clone());
    Ok(sender)
}
