//! The model's worker and the bounded queue in front of it.
//!
//! A request is admitted by taking one of `queue` permits ([`Batcher::admit`]); with none
//! left it is refused at once (the caller answers 503), so the work waiting on the model is
//! bounded and no thread is started per request. The permit travels with the job and is
//! given back when the job is answered or dropped, so a client that goes away does not
//! free its slot while its job still waits.
//!
//! One worker thread runs the model: it takes the first waiting job, gathers more for at
//! most `max_wait` until `max_batch` queries, and answers them with one forward
//! (micro-batching). Jobs whose client left or whose deadline passed are dropped unrun. When
//! a batched forward fails, each job is run alone so one bad expression fails only its own
//! request.

use crate::metrics::Metrics;
use gk_train::infer::{Answer, GroundingModel, Query};
use image::RgbImage;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

/// Why a job got no answer: an HTTP status and a message for the client.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub status: u16,
    pub msg: String,
}

/// One request's work: an image and its expressions.
pub struct Job {
    pub image: Arc<RgbImage>,
    pub exprs: Vec<String>,
    /// Past it the client has been answered 504; the job is dropped unrun.
    pub deadline: Instant,
    pub reply: oneshot::Sender<Result<Vec<Answer>, Rejection>>,
    pub permit: OwnedSemaphorePermit,
}

/// The queue's settings.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Admitted requests (waiting or running) at most.
    pub queue: usize,
    /// Queries per forward at most (a request with more runs alone).
    pub max_batch: usize,
    /// How long the worker waits for more jobs after the first.
    pub max_wait: Duration,
}

/// The queue and its worker.
pub struct Batcher {
    permits: Arc<Semaphore>,
    capacity: usize,
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl Batcher {
    /// Starts the worker thread over `model`.
    pub fn start(
        model: Arc<dyn GroundingModel>,
        cfg: BatchConfig,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let permits = Arc::new(Semaphore::new(cfg.queue));
        let in_flight = {
            let p = permits.clone();
            move || cfg.queue - p.available_permits()
        };
        let worker = std::thread::Builder::new()
            .name("gk-serve-model".into())
            .spawn(move || work(&*model, &rx, cfg, &in_flight, &metrics))?;
        Ok(Self {
            permits,
            capacity: cfg.queue,
            tx: Mutex::new(Some(tx)),
            worker: Mutex::new(Some(worker)),
        })
    }

    /// A queue slot, or `None` when all `queue` are taken.
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    /// Admitted requests not yet answered.
    pub fn depth(&self) -> usize {
        self.capacity - self.permits.available_permits()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Hands `job` to the worker; a batcher that is shutting down rejects it (503).
    pub fn submit(&self, job: Job) {
        let tx = self.tx.lock().unwrap();
        let Some(tx) = tx.as_ref() else {
            let msg = "the server is shutting down".into();
            return answer(job, Err(Rejection { status: 503, msg }));
        };
        if let Err(mpsc::SendError(job)) = tx.send(job) {
            let msg = "the model worker has stopped".into();
            answer(job, Err(Rejection { status: 500, msg }));
        }
    }

    /// Lets the worker finish what it holds, then joins it.
    pub fn shutdown(&self) {
        self.tx.lock().unwrap().take();
        if let Some(w) = self.worker.lock().unwrap().take() {
            let _ = w.join();
        }
    }
}

/// The worker loop: one batch per turn until the sending side is dropped. It waits for
/// more jobs only while other admitted requests are on their way (still decoding): a lone
/// request runs at once.
fn work(
    model: &dyn GroundingModel,
    rx: &mpsc::Receiver<Job>,
    cfg: BatchConfig,
    in_flight: &dyn Fn() -> usize,
    m: &Metrics,
) {
    let mut carry: Option<Job> = None;
    loop {
        let first = match carry.take() {
            Some(j) => j,
            None => match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            },
        };
        let mut n = first.exprs.len();
        let mut jobs = vec![first];
        let until = Instant::now() + cfg.max_wait;
        while n < cfg.max_batch {
            let next = if in_flight() > jobs.len() + carry.is_some() as usize {
                rx.recv_timeout(until.saturating_duration_since(Instant::now()))
            } else {
                rx.try_recv().map_err(|_| mpsc::RecvTimeoutError::Timeout)
            };
            match next {
                Ok(j) if n + j.exprs.len() > cfg.max_batch => {
                    carry = Some(j);
                    break;
                }
                Ok(j) => {
                    n += j.exprs.len();
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
        let now = Instant::now();
        jobs.retain(|j| !j.reply.is_closed() && j.deadline > now);
        if !jobs.is_empty() {
            run_batch(model, jobs, m);
        }
    }
}

fn queries(jobs: &[Job]) -> Vec<Query<'_>> {
    jobs.iter()
        .flat_map(|j| {
            j.exprs.iter().map(|e| Query {
                image: &j.image,
                expr: e,
            })
        })
        .collect()
}

fn rejection(e: &gk_train::TrainError) -> Rejection {
    match e {
        // an expression the tokenizer makes nothing of is the client's
        gk_train::TrainError::Data(gk_data::DataError::EmptyText) => Rejection {
            status: 400,
            msg: e.to_string(),
        },
        _ => Rejection {
            status: 500,
            msg: format!("the model failed: {e}"),
        },
    }
}

/// Answers `job`: its queue slot is free by the time the client hears back.
fn answer(job: Job, result: Result<Vec<Answer>, Rejection>) {
    drop(job.permit);
    let _ = job.reply.send(result);
}

fn run_batch(model: &dyn GroundingModel, jobs: Vec<Job>, m: &Metrics) {
    let qs = queries(&jobs);
    let t = Instant::now();
    let result = model.ground(&qs);
    m.observe_forward(qs.len(), t.elapsed());
    drop(qs);
    match result {
        Ok(mut answers) if answers.len() == jobs.iter().map(|j| j.exprs.len()).sum::<usize>() => {
            for j in jobs {
                let rest = answers.split_off(j.exprs.len());
                answer(j, Ok(std::mem::replace(&mut answers, rest)));
            }
        }
        Ok(_) => {
            for j in jobs {
                let msg = "the model gave a wrong number of answers".into();
                answer(j, Err(Rejection { status: 500, msg }));
            }
        }
        Err(e) if jobs.len() == 1 => {
            let j = jobs.into_iter().next().unwrap();
            answer(j, Err(rejection(&e)));
        }
        Err(_) => {
            for j in jobs {
                run_batch(model, vec![j], m);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeModel;

    fn job(
        b: &Batcher,
        exprs: &[&str],
    ) -> Option<oneshot::Receiver<Result<Vec<Answer>, Rejection>>> {
        let permit = b.admit()?;
        let (reply, rx) = oneshot::channel();
        b.submit(Job {
            image: Arc::new(RgbImage::new(40, 20)),
            exprs: exprs.iter().map(|s| s.to_string()).collect(),
            deadline: Instant::now() + Duration::from_secs(30),
            reply,
            permit,
        });
        Some(rx)
    }

    #[test]
    fn queue_bounds_admission_and_batches_gather_waiting_jobs() {
        let model = Arc::new(FakeModel::gated());
        let metrics = Arc::new(Metrics::default());
        let cfg = BatchConfig {
            queue: 3,
            max_batch: 4,
            max_wait: Duration::from_millis(1),
        };
        let b = Batcher::start(model.clone(), cfg, metrics.clone()).unwrap();
        // the first job holds the worker at the gate; two more wait; a fourth is refused
        let first = job(&b, &["a"]).unwrap();
        model.wait_until_running(1);
        let second = job(&b, &["bb", "ccc"]).unwrap();
        let third = job(&b, &["dddd", ""]).unwrap();
        assert_eq!(b.depth(), 3);
        assert!(job(&b, &["refused"]).is_none(), "queue of 3 is full");
        model.open_gate();
        let a = first.blocking_recv().unwrap().unwrap();
        assert_eq!(a.len(), 1);
        // the waiting two ran as one forward of four queries; the blank expression made it
        // fail, so each ran alone: only the third job gets the error
        let second = second.blocking_recv().unwrap().unwrap();
        assert_eq!(second.len(), 2);
        assert_eq!(
            second[1].bbox_xyxy,
            FakeModel::answer_for("ccc", 40, 20).bbox_xyxy
        );
        assert_eq!(third.blocking_recv().unwrap().unwrap_err().status, 400);
        assert_eq!(model.batch_sizes(), [1, 4, 2, 2]);
        assert_eq!(b.depth(), 0);
        b.shutdown();
        let r = job(&b, &["late"]).unwrap().blocking_recv().unwrap();
        assert_eq!(r.unwrap_err().status, 503);
    }
}
