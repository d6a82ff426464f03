//! A trial and its harness: calls to agents struck by faults, retries once the nodes are
//! back, the mounts checked against the model, and the checks at the end.

use super::*;

/// How a call to an agent ended.
#[derive(Debug)]
pub(super) enum Answer {
    Ok(Box<Reply>),
    /// The agent refused or failed it.
    Refused(ErrorReply),
    /// The connection broke (the agent died) or could not be made.
    Lost(String),
    /// No answer within [`OP_TIMEOUT`].
    TimedOut,
}

pub(super) async fn call(agent: PathBuf, req: Request, files: Vec<Vec<u8>>) -> Answer {
    let sent = async {
        match req {
            // An upload's files follow its request, in the order of its file entries.
            Request::VolumeUpload {
                name,
                entries,
                force,
            } => {
                let mut up = Upload::new();
                let mut files = files.into_iter();
                for e in entries {
                    if let UploadKind::File { mode, mtime_ns } = e.kind {
                        let bytes = files.next().unwrap_or_default();
                        up.add_file(&e.path, mode, mtime_ns, Source::Bytes(bytes));
                    }
                }
                up.send(&agent, &name, force, |_| {})
                    .await
                    .map_err(|e| e.to_string())
            }
            req => control::call(&agent, &req, |_| {})
                .await
                .map_err(|e| e.to_string()),
        }
    };
    match tokio::time::timeout(OP_TIMEOUT, sent).await {
        Err(_) => Answer::TimedOut,
        Ok(Err(e)) => Answer::Lost(e),
        Ok(Ok(Err(e))) => Answer::Refused(e),
        Ok(Ok(Ok(r))) => Answer::Ok(Box::new(r)),
    }
}

/// A fault struck in the middle of an operation.
#[derive(Clone, Copy, Debug)]
pub(super) enum Strike {
    /// kill -9 of node k (see [`Fleet::agent_node`]) after the delay.
    Kill { node: usize, after: Duration },
    /// A fault of failover after the delay (`--ha`).
    Ha { fault: HaFault, after: Duration },
}

/// Whether to print every operation and its time (`CHAOS_TRACE=1`).
pub(super) fn tracing() -> bool {
    std::env::var_os("CHAOS_TRACE").is_some()
}

/// Whether an error is the disk's doing (agent 2's tmpfs).
pub(super) fn is_disk_full(e: &str) -> bool {
    let e = e.to_ascii_lowercase();
    e.contains("no space") || e.contains("room") || e.contains("disk") || e.contains("full")
}

pub(super) struct Trial<'a> {
    pub(super) rng: SmallRng,
    pub(super) fleet: Fleet,
    /// Every volume's acknowledged state, by name.
    pub(super) model: BTreeMap<String, Tree>,
    /// Each agent's mounts, by volume.
    pub(super) views: Vec<BTreeMap<&'static str, View>>,
    pub(super) out: Outcome,
    pub(super) next_seed: u64,
    pub(super) next_volume: u64,
    pub(super) src: PathBuf,
    pub(super) say: &'a dyn Fn(String),
    pub(super) last: &'static str,
    /// The files of the upload in progress, in the order of its file entries.
    pub(super) uploading: Vec<Vec<u8>>,
    /// Containers' binds of mount paths (overlay mode).
    pub(super) binds: Vec<super::binds::Bind>,
    /// Every tree each mounted volume had, in order (what a switching mount may show).
    pub(super) history: BTreeMap<&'static str, Vec<Tree>>,
    /// Mounts that follow with `--follow=switch` (they move by themselves when clean).
    pub(super) switching: BTreeSet<(usize, &'static str)>,
    /// The run in failover (`--ha`).
    pub(super) ha: Option<HaTrial<'a>>,
    /// Every head a commit or reload reported, by volume and version (its commit's hash).
    pub(super) heads: BTreeMap<String, BTreeMap<u64, String>>,
}

impl Trial<'_> {
    pub(super) fn mount_path(&self, agent: usize, vol: &str) -> PathBuf {
        self.fleet.root.join(format!("mnt-{agent}-{vol}"))
    }

    pub(super) fn agent(&self, i: usize) -> PathBuf {
        self.fleet.agents[i].clone()
    }

    pub(super) fn fresh_seed(&mut self) -> u64 {
        self.next_seed += 1;
        self.next_seed
    }

    pub(super) fn scratch_volumes(&self) -> Vec<String> {
        self.model
            .keys()
            .filter(|v| !MOUNTED.contains(&v.as_str()))
            .cloned()
            .collect()
    }

    /// Runs `req` on agent `agent`; with a strike, kills that node at its time unless the
    /// call ended first. Returns the answer and whether the strike came.
    pub(super) async fn run(
        &mut self,
        agent: usize,
        req: Request,
        strike: Option<Strike>,
    ) -> (Answer, bool) {
        self.out.operations += 1;
        if tracing() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            (self.say)(format!(
                "    {:.3} agent {agent}: {req:?} {strike:?}",
                now.as_secs_f64() % 1000.0
            ));
        }
        let call = call(self.agent(agent), req, self.uploading.clone());
        let after = match strike {
            None => return (call.await, false),
            Some(Strike::Kill { after, .. } | Strike::Ha { after, .. }) => after,
        };
        tokio::pin!(call);
        tokio::select! {
            a = &mut call => return (a, false),
            _ = tokio::time::sleep(after) => {}
        }
        match strike {
            Some(Strike::Ha { fault, .. }) => {
                if let Err(e) = self.strike_ha(fault).await {
                    self.out.problem(format!("{}: {e:#}", fault.name()));
                }
            }
            Some(Strike::Kill { node, .. }) => {
                if let Err(e) = self.fleet.kill(node).await {
                    self.out.problem(format!("{e:#}"));
                }
                if node < self.fleet.coordinators() {
                    // As its service manager would, the coordinator comes back at once;
                    // what was in flight must end by itself, whether it went through or
                    // failed.
                    if let Err(e) = self.fleet.restart(node).await {
                        self.out
                            .problem(format!("the coordinator did not come back: {e:#}"));
                    }
                }
            }
            None => {}
        }
        let answer = call.await;
        if matches!(strike, Some(Strike::Ha { .. })) {
            // A fault of failover belongs to the operation it struck: the pause it began
            // ends, and the etcd member it killed comes back, before the next operation.
            if let Err(e) = self.heal_ha().await {
                self.out
                    .problem(format!("healing after a fault of failover: {e:#}"));
            }
        }
        (answer, true)
    }

    /// Starts every node that is not running (after a kill).
    pub(super) async fn heal(&mut self) -> anyhow::Result<()> {
        self.heal_ha().await?;
        for k in 0..self.fleet.node_count() {
            if !self.fleet.is_running(k) {
                self.fleet.restart(k).await?;
            }
        }
        Ok(())
    }

    /// An operation's answer after a strike or a failure: retried until it goes through,
    /// at most [`RETRIES`] times. `done_if` says whether a refusal of a retry means the
    /// interrupted attempt went through (an rm of what is gone, say).
    pub(super) async fn settle(
        &mut self,
        agent: usize,
        req: &Request,
        mut answer: Answer,
        struck: bool,
        done_if: &dyn Fn(&ErrorReply) -> bool,
    ) -> anyhow::Result<Option<Reply>> {
        let mut tries = 0;
        let mut after_fault = struck;
        loop {
            match answer {
                Answer::Ok(r) => return Ok(Some(*r)),
                Answer::TimedOut => {
                    self.out.stuck_agents += 1;
                    self.out.problem(format!(
                        "agent {agent} gave no answer to {req:?} in {OP_TIMEOUT:?}"
                    ));
                    return Ok(None);
                }
                Answer::Refused(ref e) if tries > 0 && done_if(e) => {
                    // The first attempt went through before the fault.
                    return Ok(Some(Reply::Done(e.message.clone())));
                }
                Answer::Refused(ref e) if !after_fault && !is_disk_full(&e.message) => {
                    self.out.unexplained_errors += 1;
                    self.out
                        .problem(format!("agent {agent}: {req:?} refused: {}", e.message));
                    after_fault = true;
                }
                Answer::Lost(ref e) if !after_fault => {
                    self.out.unexplained_errors += 1;
                    self.out
                        .problem(format!("agent {agent}: {req:?} lost: {e}"));
                    after_fault = true;
                }
                _ => {}
            }
            if tracing() {
                (self.say)(format!(
                    "  agent {agent}: retrying {req:?} after {}",
                    match &answer {
                        Answer::Refused(e) => e.message.clone(),
                        Answer::Lost(e) => e.clone(),
                        _ => String::new(),
                    }
                ));
            }
            tries += 1;
            if tries > RETRIES {
                self.out.stuck_agents += 1;
                self.out.problem(format!(
                    "agent {agent}: {req:?} failed {RETRIES} retries: {}",
                    match &answer {
                        Answer::Refused(e) => e.message.clone(),
                        Answer::Lost(e) => e.clone(),
                        _ => String::new(),
                    }
                ));
                return Ok(None);
            }
            self.heal().await?;
            // A node just restarted may still be finding its peers and the coordinator's
            // connection; the next attempt waits a little longer each time.
            tokio::time::sleep(Duration::from_millis(50 << tries.min(5))).await;
            self.out.operations += 1;
            answer = call(self.agent(agent), req.clone(), self.uploading.clone()).await;
        }
    }

    /// Writes all of `vol` at `dir` through agent 0, as `volume get` does, retried as
    /// [`Self::settle`] retries; whether it went through.
    async fn get_all(&mut self, vol: &str, dir: &Path) -> anyhow::Result<bool> {
        for tries in 0..=RETRIES {
            self.out.operations += 1;
            let agent = self.agent(0);
            let got = export::get(&agent, vol, "/", dir, true, |_| {});
            let why = match tokio::time::timeout(OP_TIMEOUT, got).await {
                Ok(Ok(Ok(_))) => return Ok(true),
                Ok(Ok(Err(e))) => e.message,
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer in {OP_TIMEOUT:?}"),
            };
            if tries == 0 {
                self.out.unexplained_errors += 1;
                self.out
                    .problem(format!("agent 0: get of {vol} failed: {why}"));
            }
            self.heal().await?;
            tokio::time::sleep(Duration::from_millis(50 << tries.min(5))).await;
        }
        self.out.stuck_agents += 1;
        self.out
            .problem(format!("agent 0: get of {vol} failed {RETRIES} retries"));
        Ok(false)
    }

    /// Adds each mounted volume's acknowledged tree to its history if it changed.
    pub(super) fn note_history(&mut self) {
        for vol in MOUNTED {
            let now = &self.model[vol];
            let h = self.history.get_mut(vol).expect("every mounted volume");
            if h.last() != Some(now) {
                h.push(now.clone());
            }
        }
    }

    /// Compares a mount with the snapshots it may show; a mismatch is a mixed snapshot. A
    /// switching mount may also show any tree its volume had since the one it showed last
    /// (it moved by itself), and from then on that one.
    pub(super) fn check_mount(
        &mut self,
        agent: usize,
        vol: &'static str,
        allowed: &[Tree],
        when: &str,
    ) -> anyhow::Result<bool> {
        self.note_history();
        let seen = read_tree(&self.mount_path(agent, vol))?;
        if allowed.contains(&seen) {
            return self.check_binds(agent, vol, &seen, when);
        }
        if self.switching.contains(&(agent, vol)) {
            let base = &self.views[agent][vol].base;
            let h = &self.history[vol];
            let from = h.iter().rposition(|t| t == base).unwrap_or(0);
            if h[from..].contains(&seen) {
                self.out.fault("switched_by_itself");
                self.views[agent].get_mut(vol).expect("mounted").base = seen;
                return Ok(true);
            }
        }
        self.out.mixed_snapshots += 1;
        let d = diff(&allowed[0], &seen);
        self.out.problem(format!(
            "agent {agent} mount of {vol} {when} shows no whole snapshot: {}",
            d.iter().take(4).cloned().collect::<Vec<_>>().join("; ")
        ));
        Ok(false)
    }

    /// Every bind of `agent`'s mount of `vol` shows `seen`, the mount path's tree.
    pub(super) fn check_binds(
        &mut self,
        agent: usize,
        vol: &'static str,
        seen: &Tree,
        when: &str,
    ) -> anyhow::Result<bool> {
        let views: Vec<PathBuf> = self
            .binds
            .iter()
            .filter(|b| b.agent == agent && b.vol == vol)
            .map(|b| b.view())
            .collect();
        let mut all = true;
        for v in views {
            let through = read_tree(&v)?;
            if &through != seen {
                all = false;
                self.out.mixed_snapshots += 1;
                let d = diff(seen, &through);
                self.out.problem(format!(
                    "agent {agent}: a bind of its mount of {vol} in another namespace {when} shows another tree than the mount: {}",
                    d.iter().take(4).cloned().collect::<Vec<_>>().join("; ")
                ));
            }
        }
        Ok(all)
    }

    /// An acknowledged reload (or commit) brought `agent`'s mount of `vol` to `latest`:
    /// the model's view follows, and the mount must show it.
    pub(super) fn moved_to(
        &mut self,
        agent: usize,
        vol: &'static str,
        latest: Tree,
        when: &str,
    ) -> anyhow::Result<()> {
        self.out.acknowledged += 1;
        let view = self.views[agent].get_mut(vol).expect("mounted");
        view.pending.clear();
        view.made.clear();
        view.base = latest.clone();
        self.check_mount(agent, vol, &[latest], when)?;
        Ok(())
    }

    pub(super) fn count_strike(&mut self, strike: Option<Strike>, agent_kind: &'static str) {
        match strike {
            Some(Strike::Ha { fault, .. }) => self.out.fault(fault.name()),
            Some(Strike::Kill { node, .. }) if node < self.fleet.coordinators() => {
                self.out.fault("coordinator_killed")
            }
            Some(_) => self.out.fault(agent_kind),
            None => {}
        }
    }

    /// The end of a trial: every node up, every writer's changes committed, every agent
    /// reloaded; then every mount and every scratch volume compared with the model.
    pub(super) async fn finish(&mut self) -> anyhow::Result<()> {
        self.heal().await?;
        for agent in WRITERS {
            for vol in MOUNTED {
                if !self.views[agent][vol].pending.is_empty() {
                    self.commit(agent, vol, None).await?;
                }
            }
        }
        let mut lost = BTreeSet::new();
        for agent in 0..AGENTS {
            for vol in MOUNTED {
                let req = Request::Reload {
                    name: Some(vol.into()),
                    mode: ReloadMode::Discard,
                    lazy: false,
                };
                let (a, _) = self.run(agent, req.clone(), None).await;
                let Some(reply) = self.settle(agent, &req, a, false, &|_| false).await? else {
                    continue;
                };
                self.saw_reply(vol, &reply);
                let seen = read_tree(&self.mount_path(agent, vol))?;
                for d in diff(&self.model[vol], &seen) {
                    self.out.problem(format!("agent {agent} {vol}: {d}"));
                    lost.insert(format!("{vol}:{}", d.split(':').next().unwrap_or("")));
                }
                self.check_binds(agent, vol, &seen, "at the end")?;
            }
        }
        // The scratch volumes, through agent 0: their names, then their files.
        let (a, _) = self.run(0, Request::VolumeList, None).await;
        if let Some(Reply::Volumes(list)) = self
            .settle(0, &Request::VolumeList, a, false, &|_| false)
            .await?
        {
            let names: BTreeSet<String> = list.into_iter().map(|v| v.name).collect();
            let want: BTreeSet<String> = self.model.keys().cloned().collect();
            for n in names.symmetric_difference(&want) {
                self.out.problem(format!(
                    "volume {n}: listed {} but the model says {}",
                    names.contains(n),
                    want.contains(n)
                ));
                lost.insert(format!("volume {n}"));
            }
        }
        for vol in self.scratch_volumes() {
            let dir = self.src.join(format!("get-{vol}"));
            if !self.get_all(&vol, &dir).await? {
                continue;
            }
            let seen = if dir.exists() {
                read_tree(&dir)?
            } else {
                Tree::new()
            };
            for d in diff(&self.model[&vol], &seen) {
                self.out.problem(format!("{vol}: {d}"));
                lost.insert(format!("{vol}:{}", d.split(':').next().unwrap_or("")));
            }
        }
        self.out.lost += lost.len() as u64;
        Ok(())
    }
}

/// A reload of `vol`: refusing uncommitted changes where the model knows of none (so that
/// one it does not know of shows), discarding them where there are some.
pub(super) fn reload_request(vol: &str, view: &View) -> (Request, ReloadMode) {
    let mode = if view.pending.is_empty() {
        ReloadMode::Refuse
    } else {
        ReloadMode::Discard
    };
    let req = Request::Reload {
        name: Some(vol.into()),
        mode,
        lazy: false,
    };
    (req, mode)
}

/// One trial in `root`.
pub(super) async fn trial(
    seed: u64,
    ops: usize,
    root: &Path,
    say: &dyn Fn(String),
    ha: Option<&mut HaRun>,
) -> anyhow::Result<Outcome> {
    let tmpfs = fleet::agent_dir(root, TMPFS_AGENT);
    mount_tmpfs(&tmpfs)?;
    let setup = ha.as_ref().map(|h| h.setup(seed, LEASE_TTL));
    let ha = ha.map(|h| HaTrial {
        etcd: &mut h.etcd,
        setup: setup.clone().expect("set up"),
        paused: Default::default(),
    });
    let result = trial_in(seed, ops, root, say, ha).await;
    let (mut out, acked) = match result {
        Ok(o) => o,
        Err(e) => {
            if let Some(secs) = std::env::var("CHAOS_HOLD")
                .ok()
                .and_then(|s| s.parse().ok())
            {
                // A post-mortem of the live fleet: its mounts stay as they are for a while.
                eprintln!("trial with seed {seed} failed: {e:#}; holding the fleet for {secs}s");
                tokio::time::sleep(Duration::from_secs(secs)).await;
            }
            let _ = fleet::stop(root).await;
            save_tmpfs(&tmpfs);
            voltool_agent::overlay::unmount_all_under(root);
            return Err(e);
        }
    };
    // Every store checked once its node has stopped.
    let mut problems = Vec::new();
    let t0 = Instant::now();
    let _ = fleet::stop(root).await;
    if tracing() {
        say(format!("  stop {:?}", t0.elapsed()));
    }
    for i in 0..AGENTS {
        out.unverified_bytes +=
            unverified_bytes(&fleet::agent_dir(root, i).join("store"), &mut problems)?;
    }
    // The signed heads: one chain per volume, every acknowledged one in it.
    let signer = match &setup {
        Some(_) => voltool_agent::keys::load_or_create(&root.join("fleet"))?.public(),
        None => {
            let addr = std::fs::read_to_string(root.join("coordinator").join(ADDR_FILE))?;
            addr.trim()
                .split('@')
                .next()
                .unwrap_or_default()
                .parse()
                .context("the coordinator's id")?
        }
    };
    let meta = open_meta(root, setup.as_ref()).await?;
    let s3 = setup.as_ref().map(|h| h.s3.clone());
    let scratch = root.join("bucket-check");
    let (chains, bucket) = tokio::task::spawn_blocking(move || {
        let chains = check_chains(&*meta, &signer, &acked)?;
        // In failover the origin is the bucket: every blob the fleet's records hold, read
        // back from it and checked.
        let bucket = match (&s3, meta.blob_records()) {
            (Some(s3), Some(records)) => unverified_in_bucket(&scratch, s3, &records.all_blobs()?)?,
            _ => (0, Vec::new()),
        };
        anyhow::Ok((chains, bucket))
    })
    .await??;
    out.unverified_bytes += bucket.0;
    problems.extend(bucket.1);
    out.forks += chains.forks;
    out.lost += chains.lost;
    problems.extend(chains.problems);
    if setup.is_none() {
        out.unverified_bytes +=
            unverified_bytes(&root.join("coordinator").join("origin"), &mut problems)?;
    }
    for p in problems {
        out.problem(p);
    }
    if out.failed() {
        save_tmpfs(&tmpfs);
    }
    voltool_agent::overlay::unmount_all_under(root);
    Ok(out)
}

/// The outcome of one trial, and the heads its commits and reloads reported.
type Reported = (Outcome, BTreeMap<String, BTreeMap<u64, String>>);

pub(super) async fn trial_in(
    seed: u64,
    ops: usize,
    root: &Path,
    say: &dyn Fn(String),
    ha: Option<HaTrial<'_>>,
) -> anyhow::Result<Reported> {
    let agent_args = |i: usize| -> Vec<String> {
        match i {
            TMPFS_AGENT => vec!["--store-max".into(), TMPFS_STORE_MAX.into()],
            LIAR => vec!["--evil".into()],
            _ => Vec::new(),
        }
    };
    let t0 = Instant::now();
    let fleet = match &ha {
        Some(h) => fleet::up_ha(root, AGENTS, &h.setup, &agent_args).await?,
        None => fleet::up_with(root, AGENTS, None, None, &agent_args, None).await?,
    };
    if tracing() {
        say(format!("  up {:?}", t0.elapsed()));
    }
    let src = root.join("src");
    std::fs::create_dir_all(&src)?;
    let mut t = Trial {
        rng: SmallRng::seed_from_u64(seed),
        fleet,
        model: BTreeMap::new(),
        views: vec![BTreeMap::new(); AGENTS],
        out: Outcome::default(),
        next_seed: seed << 20,
        next_volume: 0,
        src,
        say,
        last: "",
        uploading: Vec::new(),
        binds: Vec::new(),
        history: BTreeMap::new(),
        switching: BTreeSet::new(),
        ha,
        heads: BTreeMap::new(),
    };
    for vol in MOUNTED {
        let req = Request::VolumeCreate {
            name: vol.into(),
            allow_existing: false,
        };
        fleet::ask(&t.agent(0), req).await?;
        t.model.insert(vol.into(), Tree::new());
        t.history.insert(vol, vec![Tree::new()]);
        for i in 0..AGENTS {
            // The reading agent's mount of m1 switches by itself to each version its
            // follow downloads (it never writes, so it is always clean); other mounts
            // follow (prefetch) or not, at random.
            let follow = if i == LIAR && vol == "m1" {
                t.switching.insert((i, vol));
                Follow::Switch
            } else if t.rng.random_bool(0.5) {
                Follow::Prefetch
            } else {
                Follow::No
            };
            let req = Request::Mount {
                name: vol.into(),
                path: t.mount_path(i, vol),
                background_commit_secs: None,
                read_only: i == LIAR,
                follow,
                lazy: false,
            };
            fleet::ask(&t.agent(i), req).await?;
            t.views[i].insert(vol, View::default());
        }
    }
    for n in 0..ops {
        let t0 = Instant::now();
        t.step().await.with_context(|| format!("operation {n}"))?;
        if tracing() {
            (t.say)(format!("  op {n}: {:?} {:?}", t.last, t0.elapsed()));
        }
        if t.out.stuck_agents > 0 {
            (t.say)(format!(
                "seed {seed}: an agent is stuck; the trial stops here"
            ));
            break;
        }
    }
    let t0 = Instant::now();
    if t.out.stuck_agents == 0 {
        t.finish().await?;
    }
    if tracing() {
        (t.say)(format!("  finish {:?}", t0.elapsed()));
    }
    // Nothing stays paused past the trial.
    t.heal_ha().await?;
    Ok((t.out, t.heads))
}
