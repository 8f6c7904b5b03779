//! Connection limits of `tessera serve`, so that clients that open connections and
//! never finish (or never send) a request cannot take the server down:
//!
//! * at most `max_connections` connections are served at once; further ones wait in the
//!   kernel's listen backlog until one closes (the accept loop asks for a slot first);
//! * a connection that started a request must send all its headers within
//!   `header_read_timeout`;
//! * a connection with no request in progress (just accepted, or between keep-alive
//!   requests) is closed after `idle_timeout` without a byte from the client.
//!
//! A request counts as in progress from the moment its headers are parsed until its
//! response body is finished, however long a blob download or a slow handler takes.
//! The socket wrapper ([`TimedIo`]) sits under TLS, so a stalled handshake counts as a
//! request head that never completes.

use axum::body::{Body, HttpBody};
use axum::extract::Request;
use axum::response::Response;
use axum_server::accept::Accept;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tower_service::Service;

/// The limits of every connection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

/// What one connection is doing, shared by its socket wrapper and its service.
struct ConnState {
    /// The connection's slot under `max_connections`, given back when it closes.
    _slot: Option<OwnedSemaphorePermit>,
    times: Mutex<Times>,
}

struct Times {
    /// Requests whose response is not finished yet.
    in_flight: usize,
    /// When the connection last became idle (accepted, or its last response finished).
    idle_since: Instant,
    /// When the first byte of the next request arrived, if one did.
    head_started: Option<Instant>,
}

impl ConnState {
    fn times(&self) -> std::sync::MutexGuard<'_, Times> {
        self.times.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The instant the connection is to be closed unless something happens; None while a
    /// request is in progress.
    fn deadline(&self, limits: &Limits) -> Option<Instant> {
        let t = self.times();
        if t.in_flight > 0 {
            return None;
        }
        Some(match t.head_started {
            Some(s) => s + limits.header_read_timeout,
            None => t.idle_since + limits.idle_timeout,
        })
    }

    fn bytes_read(&self) {
        let mut t = self.times();
        if t.in_flight == 0 && t.head_started.is_none() {
            t.head_started = Some(Instant::now());
        }
    }

    fn request_started(self: &Arc<Self>) -> Busy {
        let mut t = self.times();
        t.in_flight += 1;
        t.head_started = None;
        Busy(self.clone())
    }
}

/// Held from a request's dispatch until its response body is finished (or dropped).
struct Busy(Arc<ConnState>);

impl Drop for Busy {
    fn drop(&mut self) {
        let mut t = self.0.times();
        t.in_flight = t.in_flight.saturating_sub(1);
        if t.in_flight == 0 {
            t.idle_since = Instant::now();
        }
    }
}

/// Waiting for a connection slot.
type Acquire = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// The make-service of the server: one [`ConnService`] per accepted connection, but
/// only when a connection slot is free (`poll_ready` waits for one).
pub struct MakeConn {
    router: axum::Router,
    slots: Arc<Semaphore>,
    acquiring: Option<Acquire>,
    slot: Option<OwnedSemaphorePermit>,
}

impl MakeConn {
    pub fn new(router: axum::Router, limits: &Limits) -> MakeConn {
        MakeConn {
            router,
            slots: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            acquiring: None,
            slot: None,
        }
    }
}

impl Service<SocketAddr> for MakeConn {
    type Response = ConnService;
    type Error = io::Error;
    type Future = std::future::Ready<Result<ConnService, io::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        if self.slot.is_none() {
            let slots = self.slots.clone();
            let fut = self
                .acquiring
                .get_or_insert_with(|| Box::pin(slots.acquire_owned()));
            let permit = ready!(fut.as_mut().poll(cx));
            self.acquiring = None;
            // The semaphore is never closed.
            self.slot = Some(permit.map_err(io::Error::other)?);
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _peer: SocketAddr) -> Self::Future {
        let state = Arc::new(ConnState {
            _slot: self.slot.take(),
            times: Mutex::new(Times {
                in_flight: 0,
                idle_since: Instant::now(),
                head_started: None,
            }),
        });
        std::future::ready(Ok(ConnService {
            router: self.router.clone(),
            state,
        }))
    }
}

/// The router for one connection, tracking its requests.
#[derive(Clone)]
pub struct ConnService {
    router: axum::Router,
    state: Arc<ConnState>,
}

impl<B> Service<axum::http::Request<B>> for ConnService
where
    B: HttpBody<Data = axum::body::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: axum::http::Request<B>) -> Self::Future {
        let busy = self.state.request_started();
        let req: Request = req.map(Body::new);
        // A Router is always ready.
        let fut = self.router.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|body| Body::new(Tracked { body, _busy: busy })))
        })
    }
}

/// A response body that keeps its request in progress until it is finished.
struct Tracked {
    body: Body,
    _busy: Busy,
}

impl HttpBody for Tracked {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The acceptor: wraps every socket (after `inner`, e.g. TCP_NODELAY, and under TLS)
/// in a [`TimedIo`] that enforces the timeouts.
#[derive(Clone)]
pub struct Limited<A> {
    inner: A,
    limits: Limits,
}

impl<A> Limited<A> {
    pub fn new(inner: A, limits: Limits) -> Limited<A> {
        Limited { inner, limits }
    }
}

impl<A, I> Accept<I, ConnService> for Limited<A>
where
    A: Accept<I, ConnService, Service = ConnService>,
    A::Future: Send + 'static,
{
    type Stream = TimedIo<A::Stream>;
    type Service = ConnService;
    type Future = Pin<Box<dyn Future<Output = io::Result<(Self::Stream, ConnService)>> + Send>>;

    fn accept(&self, stream: I, service: ConnService) -> Self::Future {
        let limits = self.limits;
        let fut = self.inner.accept(stream, service);
        Box::pin(async move {
            let (io, service) = fut.await?;
            Ok((TimedIo::new(io, service.state.clone(), limits), service))
        })
    }
}

/// A socket that fails its reads once the connection's deadline has passed.
pub struct TimedIo<I> {
    inner: I,
    state: Arc<ConnState>,
    limits: Limits,
    timer: Pin<Box<Sleep>>,
}

impl<I> TimedIo<I> {
    fn new(inner: I, state: Arc<ConnState>, limits: Limits) -> TimedIo<I> {
        let first = state.deadline(&limits).unwrap_or_else(Instant::now);
        TimedIo {
            inner,
            state,
            limits,
            timer: Box::pin(tokio::time::sleep_until(first)),
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for TimedIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.state.bytes_read();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let Some(deadline) = self.state.deadline(&self.limits) else {
                    // A request is in progress; the next read after it is polled again.
                    return Poll::Pending;
                };
                if self.timer.deadline() != deadline {
                    self.timer.as_mut().reset(deadline);
                }
                match self.timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "connection idle or request headers too slow",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for TimedIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
