//! A single-threaded queue whose consumer is a task: pushing the first item wakes it.
//!
//! Used where one part of a worker hands work to another without calling into it: the
//! engine's dirty lists (connections for a driver to flush) and the cluster inbox (events
//! for the engine). Taking swaps the whole queue with the consumer's (empty) buffer, so
//! neither side allocates once both buffers have grown to the usual batch.

use std::cell::RefCell;
use std::task::{Context, Poll, Waker};

#[derive(Debug)]
pub struct WakeQueue<T> {
    items: RefCell<Vec<T>>,
    waker: RefCell<Option<Waker>>,
}

impl<T> Default for WakeQueue<T> {
    fn default() -> Self {
        WakeQueue {
            items: RefCell::new(Vec::new()),
            waker: RefCell::new(None),
        }
    }
}

impl<T> WakeQueue<T> {
    /// Queues `item`; the consumer is woken if the queue was empty (otherwise it has been
    /// already).
    pub fn push(&self, item: T) {
        let mut items = self.items.borrow_mut();
        items.push(item);
        if items.len() == 1 {
            self.wake();
        }
    }

    /// Wakes the consumer without queueing anything (it has other work to look at).
    pub fn wake(&self) {
        if let Some(waker) = self.waker.borrow().as_ref() {
            waker.wake_by_ref();
        }
    }

    /// Moves every queued item into `into` (which is cleared first), oldest first.
    pub fn take(&self, into: &mut Vec<T>) {
        into.clear();
        std::mem::swap(&mut *self.items.borrow_mut(), into);
    }

    pub fn is_empty(&self) -> bool {
        self.items.borrow().is_empty()
    }

    /// Ready when items are queued; otherwise remembers the waker for the next push.
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.is_empty() {
            return Poll::Ready(());
        }
        let mut waker = self.waker.borrow_mut();
        match waker.as_ref() {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => *waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}
