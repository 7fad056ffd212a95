//! Graceful shutdown: every session watches one token, and the server waits
//! for them on its way down.

use std::time::Duration;

use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// The sessions of one configuration, for graceful shutdown.
#[derive(Clone, Default)]
pub(crate) struct Lifecycle {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl Lifecycle {
    pub(crate) fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.token.is_cancelled()
    }

    pub(crate) fn spawn<F>(&self, future: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(future);
    }

    pub(crate) fn live(&self) -> usize {
        self.tracker.len()
    }

    pub(crate) async fn shutdown(&self, grace: Duration) {
        self.token.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = self.tracker.len(),
                "sessions still open after the shutdown grace period"
            );
        }
    }
}
