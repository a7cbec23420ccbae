//! A bounded queue from the workers to one thread that items cross in batches: a worker fills a
//! batch of its own and hands it over whole, and the thread gives the emptied batch back to be
//! filled again.
//!
//! Handed over one by one, every item would be written into a slot of a long ring that no one
//! has touched since the ring last came round, and read from it again on the thread: two cache
//! misses per item on a busy core. A batch is memory the worker filled a moment ago, and the
//! batches go round among the few in use.

use std::cell::RefCell;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Items in a batch at most.
pub const BATCH: usize = 64;
/// Emptied batches kept for the workers to fill again.
const SPARE: usize = 64;

/// The workers' end.
#[derive(Debug)]
pub struct Inlet<T> {
    tx: SyncSender<Vec<T>>,
    spare: Arc<Mutex<Vec<Vec<T>>>>,
    per_batch: usize,
}

/// The thread's end.
#[derive(Debug)]
pub struct Outlet<T> {
    rx: Receiver<Vec<T>>,
    spare: Arc<Mutex<Vec<Vec<T>>>>,
    /// A batch [`Outlet::wait`] received, for the next [`Outlet::try_recv`].
    waited: RefCell<Option<Vec<T>>>,
}

/// A queue of about `capacity` items (at least one batch; batches are of [`BATCH`] items, fewer
/// when `capacity` is smaller).
pub fn handoff<T>(capacity: usize) -> (Inlet<T>, Outlet<T>) {
    let per_batch = capacity.clamp(1, BATCH);
    let (tx, rx) = std::sync::mpsc::sync_channel(capacity.div_ceil(per_batch).max(1));
    let spare = Arc::new(Mutex::new(Vec::new()));
    (Inlet { tx, spare: Arc::clone(&spare), per_batch }, Outlet { rx, spare, waited: RefCell::new(None) })
}

impl<T> Inlet<T> {
    /// Items a batch holds before it should be handed over.
    pub fn per_batch(&self) -> usize {
        self.per_batch
    }

    /// A batch to fill: one given back by the thread, or a new one. Empty, unless the thread
    /// gave it back with [`Outlet::recycle_filled`].
    pub fn batch(&self) -> Vec<T> {
        let spare = self.spare.lock().ok().and_then(|mut s| s.pop());
        spare.unwrap_or_else(|| Vec::with_capacity(self.per_batch))
    }

    /// Hands over what `batch` holds (it is left empty); never waits. `Err(n)`: the queue was
    /// full (or its thread gone), and the batch's `n` items were dropped.
    pub fn send(&self, batch: &mut Vec<T>) -> Result<(), usize> {
        if batch.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(batch, self.batch());
        match self.tx.try_send(full) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(mut lost) | TrySendError::Disconnected(mut lost)) => {
                let n = lost.len();
                lost.clear();
                *batch = lost;
                Err(n)
            }
        }
    }
}

impl<T> Outlet<T> {
    /// The next batch, when one waits.
    pub fn try_recv(&self) -> Result<Vec<T>, TryRecvError> {
        match self.waited.borrow_mut().take() {
            Some(batch) => Ok(batch),
            None => self.rx.try_recv(),
        }
    }

    /// Whether a batch waits (the next [`Outlet::try_recv`] returns it); never sleeps.
    pub fn ready(&self) -> bool {
        let mut waited = self.waited.borrow_mut();
        if waited.is_none() {
            *waited = self.rx.try_recv().ok();
        }
        waited.is_some()
    }

    /// Sleeps until a batch waits (or every sender is gone), for `most` at most; returns whether
    /// one does. For a thread that found nothing for a while: polled, an idle queue would cost
    /// it a wake-up every poll, while a thread asleep here costs the worker that hands it the
    /// next batch one wake-up call. (While batches keep coming, polling is cheaper: a worker's
    /// hand-over then never has a sleeping thread to wake.)
    pub fn wait(&self, most: Duration) -> bool {
        let mut waited = self.waited.borrow_mut();
        if waited.is_some() {
            return true;
        }
        match self.rx.recv_timeout(most) {
            Ok(batch) => {
                *waited = Some(batch);
                true
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        }
    }

    /// Gives an emptied batch back to the workers.
    pub fn recycle(&self, mut batch: Vec<T>) {
        batch.clear();
        self.recycle_filled(batch);
    }

    /// Gives a batch back to the workers with its items still in it, for workers that fill
    /// items again in place: an item too large to build and then move for every use (a worker
    /// that takes such a batch keeps its own count of the items it filled).
    pub fn recycle_filled(&self, batch: Vec<T>) {
        if let Ok(mut spare) = self.spare.lock()
            && spare.len() < SPARE
        {
            spare.push(batch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cross_whole_and_a_full_queue_drops_them_counted() {
        // Room for 100 items: two batches of 64.
        let (inlet, outlet) = handoff::<u32>(100);
        assert_eq!(inlet.per_batch(), BATCH);
        let mut batch = inlet.batch();
        for round in 0..3 {
            batch.extend(0..10);
            let sent = inlet.send(&mut batch);
            assert!(batch.is_empty());
            assert_eq!(sent, if round < 2 { Ok(()) } else { Err(10) }, "round {round}");
        }
        let first = outlet.try_recv().expect("a batch");
        assert_eq!(first, (0..10).collect::<Vec<_>>());
        let at = first.as_ptr();
        outlet.recycle(first);
        // The emptied batch is the next one a worker fills.
        let again = inlet.batch();
        assert!(again.is_empty() && again.as_ptr() == at);
        assert_eq!(outlet.try_recv().map(|b| b.len()), Ok(10));
        assert!(outlet.try_recv().is_err());
        // A batch given back filled comes back as it was, for its items to be filled again.
        let mut batch = inlet.batch();
        batch.extend([7, 8]);
        assert_eq!(inlet.send(&mut batch), Ok(()));
        outlet.recycle_filled(outlet.try_recv().expect("a batch"));
        assert_eq!(inlet.batch(), vec![7, 8]);
        // Nothing to hand over is not a batch.
        assert_eq!(inlet.send(&mut Vec::new()), Ok(()));
        assert!(outlet.try_recv().is_err());
    }

    #[test]
    fn a_thread_waiting_is_woken_by_the_next_batch() {
        let (inlet, outlet) = handoff::<u32>(100);
        assert!(!outlet.wait(Duration::from_millis(1)), "nothing came");
        let sender = std::thread::spawn(move || {
            let mut batch = inlet.batch();
            batch.extend([1, 2, 3]);
            assert_eq!(inlet.send(&mut batch), Ok(()));
            inlet
        });
        // Woken by the batch (far sooner than this), which the next take then returns.
        assert!(outlet.wait(Duration::from_secs(60)));
        assert!(outlet.wait(Duration::from_secs(60)) && outlet.ready(), "still there");
        assert_eq!(outlet.try_recv(), Ok(vec![1, 2, 3]));
        assert!(!outlet.ready());
        assert_eq!(outlet.try_recv(), Err(TryRecvError::Empty));
        // Every sender gone: nothing to wait for.
        drop(sender.join().expect("sender"));
        assert!(outlet.wait(Duration::from_secs(60)));
        assert!(!outlet.ready(), "nothing to take");
        assert_eq!(outlet.try_recv(), Err(TryRecvError::Disconnected));
    }

    #[test]
    fn a_small_queue_has_small_batches() {
        let (inlet, outlet) = handoff::<u8>(8);
        assert_eq!(inlet.per_batch(), 8);
        let mut batch = vec![1; 8];
        assert_eq!(inlet.send(&mut batch), Ok(()));
        batch.extend([2; 8]);
        assert_eq!(inlet.send(&mut batch), Err(8), "one batch of 8 fills a queue of 8");
        drop(outlet);
        batch.push(3);
        assert_eq!(inlet.send(&mut batch), Err(1), "the thread is gone");
    }
}
