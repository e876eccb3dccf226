//! The router's tests.

use super::*;

#[test]
fn tokens_round_trip_as_strings() {
    for v in [0u64, 1, 0x16_B374_D848, u64::MAX] {
        let t = CausalToken(PgLsn::from(v));
        assert_eq!(t.to_string().parse::<CausalToken>().unwrap(), t);
    }
    let err = "12345".parse::<CausalToken>().unwrap_err();
    assert_eq!(err.field, "causal token");
}

#[test]
fn floors_only_rise() {
    let a = Floor::At(PgLsn::from(5));
    let b = Floor::At(PgLsn::from(9));
    assert_eq!(a.max(b), b);
    assert_eq!(Floor::Any.max(a), a);
    assert_eq!(b.max(Floor::Primary), Floor::Primary);
    let s = Floor::Sampled { at: 7, after: 3 };
    assert_eq!(a.max(s), s);
    assert_eq!(s.max(b), Floor::Sampled { at: 9, after: 3 });
    assert_eq!(
        s.max(Floor::Sampled { at: 2, after: 4 }),
        Floor::Sampled { at: 7, after: 4 }
    );
    assert_eq!(Floor::Any.max(s), s);
    assert_eq!(s.max(Floor::Primary), Floor::Primary);
}

fn router_with_a_replica() -> Router {
    // A replica that is never opened: routing reads only its figures.
    let config = crate::config::Config::new(
        "postgres://u@127.0.0.1:1/db?sslmode=disable"
            .parse::<crate::config::ConnectTarget>()
            .unwrap(),
    );
    let config = Arc::new(config);
    let target = config.primary.clone();
    let opener = Opener::new(
        target,
        config.clone(),
        crate::config::TargetSessionAttrs::Any,
    )
    .unwrap();
    let pool = TargetPool::build(
        crate::conn::Route::Replica("r".into()),
        opener.clone(),
        1,
        &config,
    );
    let node = Arc::new(ReplicaNode::new("r".into(), pool, opener));
    node.set_status(ReplicaStatus::Healthy);
    Router::new(vec![node], RoutingConfig::default())
}

#[tokio::test]
async fn after_a_primary_read_only_a_sample_begun_later_lets_a_replica_serve() {
    let router = router_with_a_replica();
    let replica = &router.replicas[0];
    replica.replay_lsn.store(100, Ordering::Release);
    // A sample is in flight while the read runs: it may predate what the
    // read saw, so it does not count.
    let early = router.begin_primary_sample();
    let floor = router.after_primary_read(Floor::At(PgLsn::from(40)));
    assert_eq!(floor, Floor::Sampled { at: 40, after: 1 });
    router.end_primary_sample(early, 90, 95);
    assert_eq!(
        router.resolve(floor),
        floor,
        "a sample begun before the read ended"
    );
    assert!(
        router.choose(floor).is_none(),
        "only the primary has what the read saw"
    );
    // The next sample begins after the read: it is past everything the
    // read saw, and the floor rises to it.
    let later = router.begin_primary_sample();
    assert!(router.choose(floor).is_none());
    router.end_primary_sample(later, 118, 120);
    assert_eq!(router.resolve(floor), Floor::At(PgLsn::from(120)));
    assert!(
        router.choose(floor).is_none(),
        "the replica replayed only 100"
    );
    replica.replay_lsn.store(120, Ordering::Release);
    assert!(router.choose(floor).is_some());
    // A session floor past the sample keeps its own.
    let high = router.after_primary_read(Floor::At(PgLsn::from(500)));
    let n = router.begin_primary_sample();
    router.end_primary_sample(n, 130, 130);
    assert_eq!(router.resolve(high), Floor::At(PgLsn::from(500)));
    // A fresh session that read on the primary gets a floor too.
    let fresh = router.after_primary_read(Floor::Any);
    assert!(matches!(fresh, Floor::Sampled { at: 0, .. }));
    assert!(router.choose(fresh).is_none());
}

#[test]
fn without_replicas_a_primary_read_changes_no_floor() {
    let router = Router::new(Vec::new(), RoutingConfig::default());
    let f = Floor::At(PgLsn::from(5));
    assert_eq!(router.after_primary_read(f), f);
    assert_eq!(router.after_primary_read(Floor::Any), Floor::Any);
}
