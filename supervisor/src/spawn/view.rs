//! What the worker set shows the HTTP endpoint (`metrics_http.rs`): a [`View`] of its
//! slots, republished after every event of its loop through a watch channel, so the
//! endpoint reads it without sharing the worker set's state.

use tokio::sync::watch;

use super::WorkerSet;
use crate::metrics_http::{SlotView, View};

impl WorkerSet {
    /// A receiver of the current [`View`], for the HTTP endpoint.
    pub fn view(&self) -> watch::Receiver<View> {
        self.view.subscribe()
    }

    pub(super) fn publish_view(&self) {
        let slots = self
            .slots
            .iter()
            .map(|slot| {
                let active = slot.active.and_then(|id| self.procs.get(&id));
                SlotView {
                    restarts: slot.restarts,
                    ready_timeouts: slot.ready_timeouts,
                    ready: active.is_some_and(|p| p.ready),
                    link: active.map(|p| p.child.metrics.clone()),
                }
            })
            .collect();
        self.view.send_replace(View {
            slots,
            draining: self.shutting_down,
        });
    }
}
