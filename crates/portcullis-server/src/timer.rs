//! A reusable per-connection timer for I/O deadlines.
//!
//! `monoio::time::timeout` builds a timer entry for every call: it registers in the timer
//! wheel on its first poll and is removed from it when dropped, and the cache-padded entry makes
//! every future that holds it large to move. A keep-alive request made four of them. A
//! connection instead keeps one [`Timer`] and moves its deadline before each operation: a later
//! deadline is a store into the registered entry (the wheel finds out when the old slot comes
//! up); an earlier one re-registers it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use monoio::time::{Instant, Sleep};

/// An operation raced against a deadline: see [`Timer::until`].
pub(crate) struct Until<'a, F> {
    sleep: Pin<&'a mut Sleep>,
    fut: Pin<&'a mut F>,
}

impl<F: Future> Future for Until<'_, F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // The operation first: if both are ready, what it did counts.
        if let Poll::Ready(v) = self.fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(v));
        }
        match self.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Elapsed)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The deadline passed before the operation finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Elapsed;

pub(crate) struct Timer {
    /// Made on first use, and given back by [`Timer::release`] (an idle connection holds none).
    sleep: Option<Pin<Box<Sleep>>>,
}

impl std::fmt::Debug for Timer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timer").field("deadline", &self.sleep.as_ref().map(|s| s.deadline())).finish()
    }
}

impl Timer {
    /// A timer not yet armed (nothing is allocated or registered until its first use).
    pub(crate) fn new() -> Timer {
        Timer { sleep: None }
    }

    /// Gives the timer's memory back (it is made again on the next use).
    pub(crate) fn release(&mut self) {
        self.sleep = None;
    }

    /// Runs `fut` until `deadline`; `Err(Elapsed)` if the deadline comes first. `fut` is
    /// pinned by the caller (`pin!(…)`), so that nothing big is moved to wrap it.
    pub(crate) fn until<'a, F: Future>(&'a mut self, deadline: Instant, fut: Pin<&'a mut F>) -> Until<'a, F> {
        Until { sleep: self.expiry(deadline), fut }
    }

    /// Runs `fut` for at most `limit` from now.
    pub(crate) fn within<'a, F: Future>(&'a mut self, limit: Duration, fut: Pin<&'a mut F>) -> Until<'a, F> {
        self.until(Instant::now() + limit, fut)
    }

    /// Arms the timer for `deadline` and returns the future that completes then (for a
    /// `select!` that races it against more than one thing).
    pub(crate) fn expiry(&mut self, deadline: Instant) -> Pin<&mut Sleep> {
        let sleep = self.sleep.get_or_insert_with(|| Box::pin(monoio::time::sleep_until(deadline)));
        if sleep.deadline() != deadline {
            sleep.as_mut().reset(deadline);
        }
        sleep.as_mut()
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;

    use super::*;

    fn rt() -> monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>> {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build().expect("runtime")
    }

    #[test]
    fn finishes_or_elapses_and_can_be_reused() {
        rt().block_on(async {
            let mut t = Timer::new();
            assert_eq!(t.within(Duration::from_secs(5), pin!(async { 7 })).await, Ok(7));
            let slow = pin!(monoio::time::sleep(Duration::from_secs(5)));
            assert_eq!(t.within(Duration::from_millis(20), slow).await, Err(Elapsed));
            // After it fired, a later deadline works again, and so does an earlier one.
            assert_eq!(t.within(Duration::from_secs(5), pin!(async { 8 })).await, Ok(8));
            let quick = pin!(monoio::time::sleep(Duration::from_millis(5)));
            assert_eq!(t.within(Duration::from_secs(1), quick).await, Ok(()));
            let slow = pin!(monoio::time::sleep(Duration::from_secs(5)));
            assert_eq!(t.within(Duration::from_millis(20), slow).await, Err(Elapsed));
        });
    }
}
