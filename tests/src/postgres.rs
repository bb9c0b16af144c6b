//! PostgreSQL as a loopback process for the replica tests: Debian's
//! `postgresql` package, a fresh cluster in a temp dir on a port the OS
//! picked, stopped (immediately) when dropped. As root it runs as the
//! `postgres` user, since the server refuses to run as root.
//!
//! Without PostgreSQL installed, [`Postgres::start`] says the test was
//! skipped and returns `None`, unless `TUNNEL_REQUIRE_POSTGRES=1` (which
//! `.ci/run` sets after installing it) makes that a failure.

use std::path::PathBuf;
use std::process::Command;

use crate::TempDir;

/// A running PostgreSQL server.
pub struct Postgres {
    pub port: u16,
    bin: PathBuf,
    dir: TempDir,
    /// The `postgres` user's uid and gid, when this runs as root.
    ids: Option<(u32, u32)>,
    /// The postmaster, a child of this process so that a kill is reaped.
    server: std::sync::Mutex<Option<std::process::Child>>,
}

/// The directory of `initdb` and `pg_ctl`: the newest of Debian's
/// `/usr/lib/postgresql/N/bin`, or `pg_config --bindir`.
fn bin_dir() -> Option<PathBuf> {
    let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    debian.sort();
    if let Some((_, bin)) = debian.pop() {
        return Some(bin);
    }
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    let bin = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    bin.join("initdb").exists().then_some(bin)
}

/// The `postgres` user's ids when this runs as root (the server refuses
/// root).
fn postgres_ids() -> Option<(u32, u32)> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let user = nix::unistd::User::from_name("postgres")
        .ok()
        .flatten()
        .expect("running as root needs the postgres user (Debian's postgresql package makes it)");
    Some((user.uid.as_raw(), user.gid.as_raw()))
}

impl Postgres {
    /// A new server, or `None` (the test says it was skipped) when
    /// PostgreSQL is not installed and not required.
    pub fn start() -> Option<Postgres> {
        let Some(bin) = bin_dir() else {
            let required = std::env::var("TUNNEL_REQUIRE_POSTGRES").as_deref() == Ok("1");
            assert!(
                !required,
                "TUNNEL_REQUIRE_POSTGRES=1 and no PostgreSQL: apt-get install postgresql"
            );
            eprintln!(
                "skipped: PostgreSQL is not installed (apt-get install postgresql; .ci/run installs it and sets TUNNEL_REQUIRE_POSTGRES=1)"
            );
            return None;
        };
        let dir = TempDir::new("postgres");
        let ids = postgres_ids();
        if let Some((uid, gid)) = ids {
            std::os::unix::fs::chown(&dir.0, Some(uid), Some(gid)).expect("chown the temp dir");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let pg = Postgres { port, bin, dir, ids, server: std::sync::Mutex::new(None) };
        pg.run(
            "initdb",
            &["-D", &pg.data(), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"],
        );
        pg.start_again();
        Some(pg)
    }

    fn data(&self) -> String {
        self.dir.path("data").display().to_string()
    }

    /// A server program, run as `postgres` when this is root.
    fn command(&self, program: &str) -> Command {
        use std::os::unix::process::CommandExt as _;
        let mut cmd = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.ids {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// Runs a server program; panics with its output when it fails.
    fn run(&self, program: &str, args: &[&str]) {
        let out = self
            .command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}\nthe server's log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    /// Starts the server on its data directory (again after
    /// [`Postgres::kill`]) and waits until it accepts connections.
    pub fn start_again(&self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path("log"))
            .expect("the server's log");
        let port = self.port.to_string();
        let sockets = self.dir.0.display().to_string();
        let child = self
            .command("postgres")
            .args(["-D", &self.data(), "-p", &port, "-k", &sockets])
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(["-c", "max_connections=200"])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start postgres");
        *self.server.lock().expect("server") = Some(child);
        for _ in 0..3000 {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &port])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("PostgreSQL did not accept connections within 60 s:\n{}", self.log());
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path("log")).unwrap_or_default()
    }

    /// Stops the server at once, as a crash would (`kill -9` of the
    /// postmaster), and waits until its connections are gone.
    pub fn kill(&self) {
        if let Some(mut child) = self.server.lock().expect("server").take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Its backends exit when they see the postmaster gone.
        for _ in 0..500 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("PostgreSQL still listens on {} after SIGKILL", self.port);
    }

    /// A connection string for `dbname`, created when it is not
    /// `postgres`.
    pub fn database(&self, dbname: &str) -> String {
        if dbname != "postgres" {
            self.sql("postgres", &format!("CREATE DATABASE {dbname}"));
        }
        format!("host=127.0.0.1 port={} user=postgres dbname={dbname}", self.port)
    }

    /// Runs `sql` on `dbname` with psql.
    pub fn sql(&self, dbname: &str, sql: &str) {
        let port = self.port.to_string();
        let connect = ["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-d", dbname];
        let mut args = connect.to_vec();
        args.extend(["-q", "-v", "ON_ERROR_STOP=1", "-c", sql]);
        self.run("psql", &args);
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.server.lock().map(|mut s| s.take()).ok().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
