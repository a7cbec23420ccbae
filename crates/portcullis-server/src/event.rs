//! A one-shot, worker-local event that any number of tasks can wait for (the shutdown signal).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// Set once; wakes every waiter. Waiters that give up (dropped futures) leave no trace.
#[derive(Debug, Default)]
pub(crate) struct Event {
    set: Cell<bool>,
    waiters: RefCell<Vec<Option<Waker>>>,
    free: RefCell<Vec<usize>>,
}

impl Event {
    pub(crate) fn set(&self) {
        if self.set.replace(true) {
            return;
        }
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        self.free.borrow_mut().clear();
        for w in waiters.into_iter().flatten() {
            w.wake();
        }
    }

    pub(crate) fn is_set(&self) -> bool {
        self.set.get()
    }

    pub(crate) fn wait(&self) -> Wait<'_> {
        Wait { event: self, slot: None }
    }
}

pub(crate) struct Wait<'a> {
    event: &'a Event,
    slot: Option<usize>,
}

impl Future for Wait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let event = self.event;
        if event.set.get() {
            return Poll::Ready(());
        }
        let mut waiters = event.waiters.borrow_mut();
        match self.slot {
            Some(i) if i < waiters.len() => waiters[i] = Some(cx.waker().clone()),
            _ => {
                let waker = Some(cx.waker().clone());
                let i = match event.free.borrow_mut().pop() {
                    Some(i) => {
                        waiters[i] = waker;
                        i
                    }
                    None => {
                        waiters.push(waker);
                        waiters.len() - 1
                    }
                };
                drop(waiters);
                self.slot = Some(i);
            }
        }
        Poll::Pending
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        if let Some(i) = self.slot
            && !self.event.set.get()
        {
            if let Some(w) = self.event.waiters.borrow_mut().get_mut(i) {
                *w = None;
            }
            self.event.free.borrow_mut().push(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiters_are_woken_and_slots_reused() {
        let mut rt =
            monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build().expect("runtime");
        rt.block_on(async {
            let event = std::rc::Rc::new(Event::default());
            for _ in 0..100 {
                let e = event.clone();
                let r =
                    monoio::time::timeout(std::time::Duration::from_millis(1), async move { e.wait().await })
                        .await;
                assert!(r.is_err());
            }
            assert!(event.waiters.borrow().len() <= 1, "dropped waits free their slot");
            let e = event.clone();
            let waiter = monoio::spawn(async move { e.wait().await });
            monoio::time::sleep(std::time::Duration::from_millis(1)).await;
            event.set();
            waiter.await;
            assert!(event.is_set());
        });
    }

    #[test]
    fn a_wait_for_a_round_ends_with_a_round_begun_after_it() {
        let mut rt =
            monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build().expect("runtime");
        rt.block_on(async {
            let rounds = std::rc::Rc::new(Rounds::default());
            let ms = std::time::Duration::from_millis;
            // A round is under way when the wait begins: its end is not enough.
            let current = rounds.begin();
            let r = rounds.clone();
            let waiter = monoio::spawn(async move { monoio::time::timeout(ms(200), r.next()).await.is_ok() });
            monoio::time::sleep(ms(1)).await;
            rounds.end(current);
            monoio::time::sleep(ms(1)).await;
            let next = rounds.begin();
            rounds.end(next);
            assert!(waiter.await, "woken by the end of the round begun after it");
            // Nothing begun: the wait goes on.
            assert!(monoio::time::timeout(ms(5), rounds.next()).await.is_err());
        });
    }
}

/// Numbered rounds of a worker-local task (the sync task): a round is begun, then ended, and
/// any number of tasks wait for the end of a round begun after they asked.
#[derive(Debug, Default)]
pub(crate) struct Rounds {
    begun: Cell<u64>,
    ended: Cell<u64>,
    waiters: RefCell<Vec<Waker>>,
}

impl Rounds {
    /// A round begins; returns its number.
    pub(crate) fn begin(&self) -> u64 {
        self.begun.set(self.begun.get() + 1);
        self.begun.get()
    }

    /// Round `n` ended: wakes every waiter (those waiting for a later one wait again).
    pub(crate) fn end(&self, n: u64) {
        self.ended.set(self.ended.get().max(n));
        for w in std::mem::take(&mut *self.waiters.borrow_mut()) {
            w.wake();
        }
    }

    /// Waits until a round begun after this call has ended.
    pub(crate) fn next(&self) -> impl Future<Output = ()> + '_ {
        let want = self.begun.get() + 1;
        std::future::poll_fn(move |cx| {
            if self.ended.get() >= want {
                return Poll::Ready(());
            }
            self.waiters.borrow_mut().push(cx.waker().clone());
            Poll::Pending
        })
    }
}

/// A worker-local wake-up call for one waiting task (the sync task): [`Nudge::wake`] before or
/// while it waits makes its next [`Nudge::wait`] return.
#[derive(Debug, Default)]
pub(crate) struct Nudge {
    set: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Nudge {
    pub(crate) fn wake(&self) {
        if !self.set.replace(true)
            && let Some(w) = self.waker.borrow_mut().take()
        {
            w.wake();
        }
    }

    pub(crate) fn wait(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.set.replace(false) {
                return Poll::Ready(());
            }
            *self.waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
    }
}
