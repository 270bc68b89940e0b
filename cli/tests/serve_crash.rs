//! kill -9 of `dynamollm serve` in the middle of a re-plan (the shard loop
//! replacing the fleet make-before-break), then a restart with the same
//! config and state_dir: the command in flight is sent again with the same
//! id (the cluster's exec script is idempotent by instance and sees the id
//! twice), nothing is applied twice, no instance is spawned under a second
//! id, and the plan and inventory are the ones saved before the kill.
//! Real Mosquitto (`DYNAMOLLM_TEST_MQTT`), the real binary as a child process.

mod serve_support;

use serde_json::Value;
use serve_support::*;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

fn starts(log: &[Vec<String>], id: &str) -> usize {
    log.iter().filter(|l| l[0] == id && l[3] == "start").count()
}

fn dones<'a>(log: &'a [Vec<String>], id: &str) -> Vec<&'a str> {
    log.iter().filter(|l| l[0] == id && l[3] == "done").map(|l| l[4].as_str()).collect()
}

/// Pool id → (classes, target) of a status document.
fn plan(s: &Value) -> BTreeMap<u64, (Value, Value)> {
    s["pools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_u64().unwrap(), (p["classes"].clone(), p["target"].clone())))
        .collect()
}

/// Instance id → (pool, tp).
fn fleet(s: &Value) -> BTreeMap<u64, (u64, u64)> {
    instances(s).into_iter().map(|(id, i)| (id, (i.0, i.1))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_replan_then_restart_repeats_nothing_and_recovers_the_plan() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let cluster = FakeCluster::new(&dir.path().join("cluster"));
    let state_dir = dir.path().join("state");
    let port = free_port();
    let mut opts = Opts::new(&state_dir, broker(), &unique_prefix("crash"));
    opts.listen = format!("127.0.0.1:{port}");
    opts.stale_after_s = 60.0;
    let config = dir.path().join("dynamollm.toml");
    std::fs::write(&config, config_text(&opts, &cluster)).unwrap();
    let service_log = dir.path().join("service.log");
    let api = Api::new(&opts.listen);

    let mut svc = Proc::start(env!("CARGO_BIN_EXE_dynamollm"), &config, &service_log);
    let c = cluster.clone();
    let feed =
        Feeder::start(opts.mqtt.clone(), &opts.prefix, move || c.nodes(), Duration::from_millis(100), opts.speed, 0.5);
    let first = wait_for("the first fleet to serve", Duration::from_secs(30), || async {
        let s = api.try_status().await?;
        let inst = instances(&s);
        if !inst.is_empty() && inst.values().all(|i| i.3 == "serving") && s["pending_actions"] == 0 {
            Ok(s)
        } else {
            Err(format!("pending {} instances {inst:?}", s["pending_actions"]))
        }
    })
    .await;

    // More load: the next shard step plans a bigger fleet; spawns now take 2 s.
    std::fs::write(cluster.dir.join("spawn_sleep"), "2").unwrap();
    let spawned_before: BTreeSet<String> =
        cluster.log().iter().filter(|l| l[1] == "spawn").map(|l| l[0].clone()).collect();
    *feed.rate_rps.lock().unwrap() = 6.0;
    let in_flight = wait_for("a spawn of the re-plan in flight", Duration::from_secs(30), || async {
        let log = cluster.log();
        log.iter()
            .find(|l| {
                l[1] == "spawn" && l[3] == "start" && !spawned_before.contains(&l[0]) && dones(&log, &l[0]).is_empty()
            })
            .map(|l| (l[0].clone(), l[2].parse::<u64>().unwrap()))
            .ok_or_else(|| format!("{log:?}"))
    })
    .await;
    let before = api.status().await;
    svc.kill9();
    let (id, inst) = in_flight;
    let log_at_kill = cluster.log();
    assert!(dones(&log_at_kill, &id).is_empty(), "the kill came too late: {id} had finished");

    // What the dead service left: the write-ahead state and the audit log.
    let saved: Value = serde_json::from_slice(&std::fs::read(state_dir.join("state.json")).unwrap()).unwrap();
    let pending: Vec<String> =
        saved["pending"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap().to_string()).collect();
    assert!(pending.contains(&id), "{id} is not pending in the saved state: {pending:?}");
    let issued: Vec<String> = {
        let audit = actuators::AuditLog::open(&service::audit_path(&state_dir)).unwrap();
        audit.in_flight().unwrap().into_iter().map(|r| r.id.0).collect()
    };
    assert!(issued.contains(&id), "{id} is not in flight in the audit log: {issued:?}");
    let saved_fleet: BTreeSet<u64> =
        saved["instances"].as_array().unwrap().iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert!(saved_fleet.contains(&inst), "the spawning instance {inst} is not in the saved inventory");

    // The cluster finishes what it was doing (the script outlives the service).
    wait_for("the orphaned spawn to finish", Duration::from_secs(10), || async {
        let log = cluster.log();
        let d = dones(&log, &id);
        if d == ["created"] {
            Ok(())
        } else {
            Err(format!("{d:?}"))
        }
    })
    .await;
    std::fs::write(cluster.dir.join("spawn_sleep"), "0").unwrap();

    // Restart: the same state comes back before anything new is decided.
    let mut svc = Proc::start(env!("CARGO_BIN_EXE_dynamollm"), &config, &service_log);
    let recovered = wait_for("the restarted API", Duration::from_secs(20), || api.try_status()).await;
    assert_eq!(plan(&recovered), plan(&before), "the pools' plan after the restart");
    assert_eq!(fleet(&recovered), fleet(&before), "the inventory after the restart");
    assert_eq!(fleet(&recovered).keys().copied().collect::<BTreeSet<_>>(), saved_fleet);
    assert!(
        recovered["time_s"].as_f64().unwrap() >= saved["saved_at_s"].as_f64().unwrap(),
        "service time goes on from the save"
    );

    // Every command pending at the kill is answered, the in-flight one with its old id.
    let actions = wait_for("the pending commands to be answered", Duration::from_secs(20), || async {
        let s = api.try_status().await?;
        let a = api.actions().await;
        let open: Vec<&String> =
            pending.iter().filter(|p| !a.iter().any(|r| r["id"] == **p && r["state"] == "applied")).collect();
        let serving = instances(&s).get(&inst).is_some_and(|i| i.3 == "serving");
        if open.is_empty() && serving {
            Ok(a)
        } else {
            Err(format!("not applied: {open:?}; instance {inst} serving: {serving}"))
        }
    })
    .await;
    let rec = actions.iter().find(|r| r["id"] == id.as_str()).unwrap();
    assert_eq!(rec["attempts"], 2, "sent before the kill and once after: {rec}");
    assert_eq!(rec["applied"], 1, "{rec}");
    assert_eq!(rec["placement"]["node"], format!("site/n{inst}"), "{rec}");
    let log = cluster.log();
    assert_eq!(starts(&log, &id), 2, "the exec script saw {id} twice: {log:?}");
    assert_eq!(dones(&log, &id), ["created", "exists"], "the second run of {id} created nothing: {log:?}");

    // Nothing applied twice, no id run more than once but those in flight at the kill.
    let ids: Vec<&str> = actions.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), ids.len(), "an id twice in the audit log");
    for r in &actions {
        assert!(r["applied"].as_u64().unwrap() <= 1, "applied more than once: {r}");
    }
    let all_ids: BTreeSet<&String> = log.iter().map(|l| &l[0]).collect();
    for i in all_ids {
        let n = starts(&log, i);
        let allowed = if issued.contains(i) { 2 } else { 1 };
        assert!(n <= allowed, "{i} ran {n} times (in flight at the kill: {}): {log:?}", issued.contains(i));
    }
    // One spawn id per instance, one node created per instance.
    let mut spawn_ids: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for l in log.iter().filter(|l| l[1] == "spawn") {
        spawn_ids.entry(&l[2]).or_default().insert(&l[0]);
    }
    for (i, ids) in &spawn_ids {
        assert_eq!(ids.len(), 1, "instance {i} spawned under several ids {ids:?}");
        let created = log
            .iter()
            .filter(|l| l[1] == "spawn" && l[2] == *i && l.get(4).map(String::as_str) == Some("created"))
            .count();
        assert!(created <= 1, "instance {i} created {created} times");
    }
    assert!(
        fleet(&first).keys().all(|i| spawn_ids.contains_key(i.to_string().as_str())),
        "the first fleet went through the exec script"
    );

    // The service carries on from the recovered plan: the new fleet serves.
    let after = wait_for("the re-planned fleet to serve", Duration::from_secs(20), || async {
        let s = api.try_status().await?;
        let inst = instances(&s);
        if s["pending_actions"] == 0 && inst.len() > fleet(&first).len() && inst.values().all(|i| i.3 != "starting") {
            Ok(s)
        } else {
            Err(format!("pending {} instances {inst:?}", s["pending_actions"]))
        }
    })
    .await;
    // ...and the break half of make-before-break: an instance that served before the kill is retired
    // (which one depends on the mix the shard loop settles on: one of the first fleet, a surplus one
    // of the re-plan's, or the last one of a pool whose classes moved to another pool).
    let retired = wait_for("an old instance retired", Duration::from_secs(20), || async {
        let a = api.actions().await;
        a.iter()
            .find(|r| {
                kind(r) == "retire" && r["state"] == "applied" && fleet(&before).contains_key(&instance(r).unwrap())
            })
            .cloned()
            .ok_or_else(|| format!("{:?}", a.iter().map(|r| (&r["id"], kind(r), instance(r))).collect::<Vec<_>>()))
    })
    .await;
    let old = instance(&retired).unwrap();
    let pool = fleet(&before)[&old].0;
    // Checked against the cluster's own log: when the retire started, every class its pool had served
    // was routed (that route done) to a pool with another instance up (its spawn done, not retired).
    let a = api.actions().await;
    let log = cluster.log();
    let at = |id: &Value, what: &str| log.iter().position(|l| Some(l[0].as_str()) == id.as_str() && l[3] == what);
    let retire_start = at(&retired["id"], "start").expect("the retire ran through the exec script");
    let pool_of: BTreeMap<u64, u64> = a
        .iter()
        .filter(|r| kind(r) == "spawn")
        .map(|r| (instance(r).unwrap(), r["action"]["pool"].as_u64().unwrap()))
        .collect();
    let routing = |s: &Value| -> BTreeMap<String, u64> {
        s["classes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["class"].as_str().unwrap().to_string(), c["pool"].as_u64().unwrap()))
            .collect()
    };
    let mut route = routing(&first);
    let mut routes_done: Vec<(usize, &Value)> = a
        .iter()
        .filter(|r| kind(r) == "route")
        .filter_map(|r| at(&r["id"], "done").filter(|&p| p < retire_start).map(|p| (p, r)))
        .collect();
    routes_done.sort_by_key(|(p, _)| *p);
    let mut served: BTreeSet<String> = [routing(&first), routing(&before)]
        .iter()
        .flat_map(|m| m.iter().filter(|(_, &p)| p == pool).map(|(c, _)| c.clone()))
        .collect();
    for (_, r) in routes_done {
        let class = r["action"]["class"].as_str().unwrap().to_string();
        let to = r["action"]["pool"].as_u64().unwrap();
        if to == pool {
            served.insert(class.clone());
        }
        route.insert(class, to);
    }
    let up = |j: u64| {
        let spawned = a.iter().any(|r| {
            kind(r) == "spawn" && instance(r) == Some(j) && at(&r["id"], "done").is_some_and(|p| p < retire_start)
        });
        let retiring = a.iter().any(|r| {
            kind(r) == "retire" && instance(r) == Some(j) && at(&r["id"], "start").is_some_and(|p| p < retire_start)
        });
        spawned && !retiring
    };
    assert!(!served.is_empty(), "pool {pool} of the retired instance {old} never served a class: {route:?}");
    for class in &served {
        let to = route[class];
        assert!(
            pool_of.iter().any(|(&j, &p)| p == to && j != old && up(j)),
            "instance {old} of pool {pool} was retired while class {class} (routed to pool {to}) had no other \
             instance up: routing {route:?}, exec log {log:?}"
        );
    }
    assert!(!cluster.nodes().contains_key(&(old as u32)), "the retired node {old} still runs");
    // The router's table catches up with the controller's, and nothing stays held.
    wait_for("the router's table to be the controller's", Duration::from_secs(20), || async {
        let s = api.try_status().await?;
        let behind: Vec<&Value> =
            s["classes"].as_array().unwrap().iter().filter(|c| c["routed_pool"] != c["pool"]).collect();
        let m = api.metrics().await;
        let gauge = |q: &str| {
            let name = format!("dynamollm_service{{quantity=\"{q}\"}} ");
            m.lines().find_map(|l| l.strip_prefix(name.as_str())).and_then(|v| v.trim().parse::<f64>().ok())
        };
        if behind.is_empty()
            && s["held_retires"].as_array().is_some_and(|h| h.is_empty())
            && gauge("classes_unrouted") == Some(0.0)
            && gauge("held_retires") == Some(0.0)
        {
            Ok(())
        } else {
            Err(format!(
                "behind {behind:?}, held {}, gauges {:?}",
                s["held_retires"],
                (gauge("classes_unrouted"), gauge("held_retires"))
            ))
        }
    })
    .await;
    svc.kill9();
    eprintln!(
        "crash test: {:?} wall; killed during {id} (instance {inst}); {} commands pending at the kill, {} in flight; fleet {} → {}; instance {old} retired after the restart",
        started.elapsed(),
        pending.len(),
        issued.len(),
        fleet(&first).len(),
        fleet(&after).len()
    );
}
