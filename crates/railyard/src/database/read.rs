//! The read path: a routed check-out ([`ReadLease`]) at or past a floor, the
//! read entry points and the floors a session reads at.

use super::*;

/// A connection for a read, and what it promises.
pub(super) struct ReadLease {
    pub(super) conn: PooledConn,
    pub(super) route: Route,
    /// The replica it came from, so a failure can be judged.
    pub(super) node: Option<Arc<ReplicaNode>>,
    /// The oldest data this read may return (what the session may assume after).
    pub(super) seen: Floor,
    /// Counts the read in flight on its replica while it lives.
    pub(super) _outstanding: Option<Outstanding>,
}

impl CommitPosition {
    /// The floor a session must read at after this commit.
    pub(crate) fn floor(self) -> Floor {
        match self {
            CommitPosition::NotRecorded => Floor::Any,
            CommitPosition::At(lsn) => Floor::At(lsn),
            CommitPosition::Unknown => Floor::Primary,
        }
    }
}

impl Database {
    /// A connection for a read at or past `floor`: a caught-up replica, else
    /// the primary (per the routing config's [`Fallback`]); a lent handle's
    /// source decides for itself.
    pub(super) async fn checkout_read(&self, floor: Floor) -> Result<ReadLease, Error> {
        if self.inner.gate.is_closed() {
            return Err(Error::Closed { source: None });
        }
        let router = match &self.inner.connections {
            Connections::Pooled { router, .. } => router,
            Connections::Lent(source) => {
                let (conn, route) = source.checkout_read(floor != Floor::Any).await?;
                return Ok(ReadLease {
                    conn,
                    route,
                    node: None,
                    seen: floor,
                    _outstanding: None,
                });
            }
        };
        let mut floor = router.resolve(floor);
        let mut choice = router.choose(floor);
        if choice.is_none()
            && let Floor::At(_) | Floor::Sampled { .. } = floor
            && let Fallback::Wait(bound) = router.config.fallback
        {
            let deadline = tokio::time::Instant::now() + bound;
            while choice.is_none() && tokio::time::Instant::now() < deadline {
                router
                    .changed(deadline.saturating_duration_since(tokio::time::Instant::now()))
                    .await;
                floor = router.resolve(floor);
                choice = router.choose(floor);
            }
        }
        if let Some((node, outstanding)) = choice {
            // Cached before the read: the data read includes at least this.
            let seen = match node.replay_lsn() {
                0 => floor,
                lsn => floor.max(Floor::At(PgLsn::from(lsn))),
            };
            match node.pool.get_owned().await {
                Ok(conn) => {
                    return Ok(ReadLease {
                        conn: PooledConn::pooled(conn).marked(&self.inner.gate),
                        route: Route::Replica(node.name.clone()),
                        node: Some(node),
                        seen,
                        _outstanding: Some(outstanding),
                    });
                }
                // A busy replica is not a failing one, and its overflow does
                // not belong on the primary: the caller hears "busy".
                Err(e @ (Error::Overloaded { .. } | Error::Closed { .. })) => {
                    self.note_failed_checkout(&e);
                    return Err(e);
                }
                Err(e) => node.note_failure(e.to_string()),
            }
        }
        Ok(ReadLease {
            conn: self.checkout(Want::Primary).await?,
            route: Route::Primary,
            node: None,
            seen: floor,
            _outstanding: None,
        })
    }

    /// Reads, on a healthy replica when there is one (round-robin or least
    /// outstanding), else on the primary. Without a [`Session`] there is no
    /// read-your-writes guarantee: use [`Database::session`] after writes.
    /// A read that fails on a replica because of the replica (its connection,
    /// a recovery conflict) runs again on the primary; one whose primary
    /// connection was lost under it (reset, closed, given up as stalled)
    /// runs again on a new connection, within the retry policy and budget.
    /// Any other failure is returned as it is.
    pub async fn read<F: ConnWork>(&self, f: F) -> Result<F::Value, F::Error> {
        self.read_at(Floor::Any, f).await.map(|(v, _, _)| v)
    }

    /// Like [`Database::read`], and says where the read ran.
    pub async fn read_routed<F: ConnWork>(&self, f: F) -> Result<(F::Value, Route), F::Error> {
        self.read_at(Floor::Any, f).await.map(|(v, r, _)| (v, r))
    }

    /// A new session (read-your-writes, monotonic reads).
    pub fn session(&self) -> Session {
        Session::new(self.clone(), Floor::Any)
    }

    /// A session that continues from a token, typically from another request.
    pub fn session_from(&self, token: CausalToken) -> Session {
        Session::new(self.clone(), Floor::At(token.lsn()))
    }

    /// Where a read would go now, for a session at `token` (or any session when
    /// `None`): the routing decision alone, from cached figures, no I/O.
    pub fn route_for_read(&self, token: Option<CausalToken>) -> Route {
        let floor = token.map_or(Floor::Any, |t| Floor::At(t.lsn()));
        let Connections::Pooled { router, .. } = &self.inner.connections else {
            return Route::Replica("test-connection".into());
        };
        match router.choose(floor) {
            Some((node, _outstanding)) => Route::Replica(node.name.clone()),
            None => Route::Primary,
        }
    }

    /// Runs a read at or past `floor`. Returns the value, the route, and the
    /// floor the data is known to include.
    pub(crate) async fn read_at<F: ConnWork>(
        &self,
        floor: Floor,
        f: F,
    ) -> Result<(F::Value, Route, Floor), F::Error> {
        let lease = self.checkout_read(floor).await?;
        let wire = lease.conn.wire_arc();
        let mark = wire.mark();
        self.read_on(lease, floor, f)
            .await
            .map_err(|e| self.after_close(e, &wire, mark))
    }

    /// Runs a read on its lease (see [`Database::read_at`]).
    pub(super) async fn read_on<F: ConnWork>(
        &self,
        lease: ReadLease,
        floor: Floor,
        f: F,
    ) -> Result<(F::Value, Route, Floor), F::Error> {
        if lease.conn.enclosed() {
            let (v, _) = exec::in_savepoint(lease.conn, f, false, None, self.contention())
                .await
                .map_err(exec::Failed::into_error)?;
            return Ok((v, lease.route, lease.seen));
        }
        let ReadLease {
            mut conn,
            route,
            node,
            seen,
            _outstanding,
        } = lease;
        let Some(node) = node else {
            // (A harness's stale-replica read has no node either.)
            if route != Route::Primary {
                return Ok((f(&mut conn).await?, route, seen));
            }
            let v = self.read_on_primary(conn, f).await?;
            return Ok((v, route, self.after_primary_read(seen)));
        };
        let wire = conn.wire_arc();
        let mark = wire.mark();
        match f.clone()(&mut conn).await {
            Ok(v) => Ok((v, route, seen)),
            Err(e) => {
                let server = wire.error_since(mark);
                let class = match &server {
                    Some(s) => s.class(wire.is_closed()),
                    None => classify(None, wire.is_closed()),
                };
                drop(conn);
                // A closing handle starts nothing new, and a replica that
                // failed because of the close is not at fault.
                if self.lifecycle() != Lifecycle::Open || !node.after_failed_read(class) {
                    return Err(e);
                }
                let mut conn = self.checkout(Want::Primary).await?;
                let v = f(&mut conn).await?;
                Ok((v, Route::Primary, self.after_primary_read(floor)))
            }
        }
    }

    /// Runs a read on a primary connection, again on a new one when the
    /// connection was lost (see `exec::read_primary`).
    pub(super) async fn read_on_primary<F: ConnWork>(
        &self,
        conn: PooledConn,
        f: F,
    ) -> Result<F::Value, F::Error> {
        exec::read_primary(self, conn, f).await
    }

    /// The floor after a read on the primary, which just ended. The primary's
    /// data is the newest: a causal session must not read older data
    /// afterwards (monotonic reads), not even other sessions' commits that
    /// its floor does not cover. That needs a position past everything the
    /// read saw, and asking the read's connection for one would cost a round
    /// trip on every fallback read. A position sampled *before* the read is
    /// not enough (it may predate commits the read saw); one sampled after
    /// is. So the floor becomes [`Floor::Sampled`]: the primary's position at
    /// the primary monitor's next sample (within a check interval), and until
    /// then the session reads from the primary, which costs no round trip
    /// more than a replica. No I/O here.
    pub(super) fn after_primary_read(&self, floor: Floor) -> Floor {
        match &self.inner.connections {
            Connections::Pooled { router, .. } => router.after_primary_read(floor),
            Connections::Lent(_) => floor,
        }
    }

    /// `floor`, resolved from the monitors' figures when it waited for a
    /// sample of the primary's position (see [`Floor::Sampled`]); no I/O.
    pub(crate) fn resolve_floor(&self, floor: Floor) -> Floor {
        match &self.inner.connections {
            Connections::Pooled { router, .. } => router.resolve(floor),
            Connections::Lent(_) => floor,
        }
    }
}
