//! Reaching etcd: one member at a time, the next when it cannot be reached, from any
//! thread through the state's own runtime.

use super::*;

/// A client of one member, checked with one read (connecting is lazy).
pub(super) async fn connect_one(
    endpoint: &str,
    opts: &ConnectOptions,
) -> Result<Client, etcd_client::Error> {
    let mut c = Client::connect([endpoint], Some(opts.clone())).await?;
    c.get("voltool-probe", Some(GetOptions::new().with_count_only()))
        .await?;
    Ok(c)
}

/// Whether a call failed for want of its member: for a write, only where the call never
/// left (a transport error, or a connection that could not be made, which tonic reports as
/// `Unavailable` with a connect error); for a read, any `Unavailable`, and a connection
/// that broke under the call (tonic reports that as `Unknown`, "transport error": a member
/// killed while it answered).
pub(crate) fn unreachable(e: &etcd_client::Error, write: bool) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::Unavailable => {
            !write || s.message().contains("connect")
        }
        etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::Unknown => {
            !write && s.message().contains("transport error")
        }
        _ => false,
    }
}

/// Whether a write that failed so may still have landed (or land yet): its call reached a
/// member, and the answer did not come (a timeout, a change of etcd's leader).
pub(crate) fn ambiguous(e: &etcd_client::Error) -> bool {
    use tonic::Code;
    match e {
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
        ),
        _ => false,
    }
}

impl EtcdMeta {
    /// Connects to the members of `url` (TLS with a client certificate unless `tls` is
    /// none) and checks that they answer.
    pub fn connect(url: &EtcdUrl, tls: Option<&EtcdTls>) -> Result<Self, MetaError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd")
            .enable_all()
            .build()
            .map_err(engine)?;
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .with_require_leader(true);
        let scheme = match tls {
            Some(t) => {
                let read = |p: &std::path::Path| {
                    std::fs::read(p).map_err(|e| engine(format!("{}: {e}", p.display())))
                };
                let tls = etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(read(&t.ca)?))
                    .identity(etcd_client::Identity::from_pem(
                        read(&t.cert)?,
                        read(&t.key)?,
                    ));
                opts = opts.with_tls(tls);
                "https"
            }
            None => "http",
        };
        let endpoints: Vec<String> = url
            .endpoints
            .iter()
            .map(|e| format!("{scheme}://{e}"))
            .collect();
        let mut last = None;
        for (i, e) in endpoints.iter().enumerate() {
            match rt.block_on(connect_one(e, &opts)) {
                Ok(client) => {
                    return Ok(EtcdMeta {
                        rt: Some(rt),
                        endpoints,
                        opts,
                        current: std::sync::Mutex::new((i, client)),
                        url: url.clone(),
                        fence: RwLock::new(None),
                        writes: rand::random::<u64>().into(),
                        lose: Default::default(),
                        compact_at: Default::default(),
                        fenced: Default::default(),
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(engine(format!(
            "{url}: no member answers: {}",
            last.expect("at least one member")
        )))
    }

    /// A client of the member in use (elections and leases go through it too).
    pub fn client(&self) -> Client {
        self.current.lock().expect("not poisoned").1.clone()
    }

    /// The member in use: its index, to name it in [`Self::move_on`].
    pub fn member(&self) -> usize {
        self.current.lock().expect("not poisoned").0
    }

    /// After a call to member `failed` could not reach it: moves to the next member that
    /// answers (unless another call moved already). Runs on any runtime but etcd's own.
    pub(super) fn move_on(&self, failed: usize) {
        let rt = self
            .rt
            .as_ref()
            .expect("the runtime lives as long as the state");
        let next = self.next_member(failed);
        if let Ok(Some((i, client))) = futures_lite::future::block_on(rt.spawn(next)) {
            self.moved(failed, i, client);
        }
    }

    /// [`Self::move_on`] from a task on etcd's runtime (the lease's keep-alive, the
    /// campaign).
    pub(crate) async fn move_on_async(&self, failed: usize) {
        if let Some((i, client)) = self.next_member(failed).await {
            self.moved(failed, i, client);
        }
    }

    /// The first member after `failed` that answers, with a client of it (none if another
    /// call moved on already, or none answers).
    pub(super) fn next_member(
        &self,
        failed: usize,
    ) -> impl Future<Output = Option<(usize, Client)>> + Send + 'static {
        let n = self.endpoints.len();
        let stale = self.member() != failed || n < 2;
        let (endpoints, opts) = (self.endpoints.clone(), self.opts.clone());
        async move {
            if stale {
                return None;
            }
            for k in 1..n {
                let i = (failed + k) % n;
                if let Ok(client) = connect_one(&endpoints[i], &opts).await {
                    return Some((i, client));
                }
            }
            None
        }
    }

    pub(super) fn moved(&self, failed: usize, i: usize, client: Client) {
        let mut c = self.current.lock().expect("not poisoned");
        if c.0 == failed {
            tracing::warn!(failed = %self.endpoints[failed], now = %self.endpoints[i], "etcd: a member did not answer: moved to another");
            *c = (i, client);
        }
    }

    /// Calls `f` with a client of the member in use; where the member cannot be reached,
    /// calls again with the next. A write goes again only when its call never reached a
    /// member (a connection refused or failing to open); a read also when its answer did
    /// not come.
    pub(super) fn call<T: Send + 'static, Fut>(
        &self,
        write: bool,
        f: impl Fn(Client) -> Fut,
    ) -> Result<T, MetaError>
    where
        Fut: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        self.try_call(write, f)?.map_err(engine)
    }

    /// [`Self::call`], with etcd's own error when the tries end in one.
    pub(super) fn try_call<T: Send + 'static, Fut>(
        &self,
        write: bool,
        f: impl Fn(Client) -> Fut,
    ) -> Result<Result<T, etcd_client::Error>, MetaError>
    where
        Fut: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        let tries = 2 * self.endpoints.len();
        let mut attempt = 0;
        loop {
            let (i, client) = {
                let c = self.current.lock().expect("not poisoned");
                (c.0, c.1.clone())
            };
            let rt = self
                .rt
                .as_ref()
                .expect("the runtime lives as long as the state");
            let r = futures_lite::future::block_on(rt.spawn(f(client))).map_err(engine)?;
            match r {
                Err(e) if attempt + 1 < tries && unreachable(&e, write) => {
                    attempt += 1;
                    self.move_on(i);
                }
                r => return Ok(r),
            }
        }
    }

    /// Where the state is.
    pub fn url(&self) -> &EtcdUrl {
        &self.url
    }

    /// Runs `f` on the runtime etcd's calls use and waits for it, from any thread.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    ) -> Result<T, MetaError> {
        let rt = self
            .rt
            .as_ref()
            .expect("the runtime lives as long as the state");
        futures_lite::future::block_on(rt.spawn(f))
            .map_err(engine)?
            .map_err(engine)
    }

    /// Runs `f` on the runtime etcd's calls use, without waiting.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl Future<Output = T> + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        self.rt
            .as_ref()
            .expect("the runtime lives as long as the state")
            .spawn(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_connection_sends_a_read_to_another_member_and_never_a_write() {
        let broken = etcd_client::Error::GRpcStatus(tonic::Status::new(
            tonic::Code::Unknown,
            "transport error",
        ));
        assert!(unreachable(&broken, false));
        assert!(!unreachable(&broken, true), "a write may have landed");
        assert!(ambiguous(&broken), "a write is settled by a read");
        let refused = etcd_client::Error::GRpcStatus(tonic::Status::new(
            tonic::Code::Unavailable,
            "error trying to connect",
        ));
        assert!(unreachable(&refused, true) && unreachable(&refused, false));
        let other = etcd_client::Error::GRpcStatus(tonic::Status::new(
            tonic::Code::Unknown,
            "something else",
        ));
        assert!(!unreachable(&other, false));
    }
}
