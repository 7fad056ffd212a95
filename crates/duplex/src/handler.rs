//! What a route's handler may be: an async function of the session that
//! returns `()` or a `Result`.

use std::future::Future;

use crate::{driver::HandlerFuture, error::BoxError};

/// An async function that handles one session.
///
/// Implemented for every `Fn(S) -> impl Future<Output = O>` that is `Clone +
/// Send + Sync + 'static`, where `O` is `()` or `Result<(), E>` with `E`
/// convertible to a boxed error. A handler that returns an error, or panics,
/// closes its session with 1011; other sessions do not notice.
pub trait Handler<S>: Clone + Send + Sync + 'static {
    /// Starts the handler for one session.
    #[doc(hidden)]
    fn call(&self, session: S) -> HandlerFuture;
}

impl<S, F, Fut> Handler<S> for F
where
    F: Fn(S) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: IntoOutcome,
{
    fn call(&self, session: S) -> HandlerFuture {
        let future = self(session);
        Box::pin(async move { future.await.into_outcome() })
    }
}

/// What a handler may return.
pub trait IntoOutcome {
    /// The handler's result as `Result<(), BoxError>`.
    fn into_outcome(self) -> Result<(), BoxError>;
}

impl IntoOutcome for () {
    fn into_outcome(self) -> Result<(), BoxError> {
        Ok(())
    }
}

impl<E: Into<BoxError>> IntoOutcome for Result<(), E> {
    fn into_outcome(self) -> Result<(), BoxError> {
        self.map_err(Into::into)
    }
}
