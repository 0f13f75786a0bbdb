// PM2 process file for syncworker: `pm2 start ecosystem.config.js`.
module.exports = {
  apps: [
    {
      name: "syncworker",
      // Resolve the script and syncworker.toml next to this file, wherever
      // `pm2 start` is run from (.venv is what `make install` creates).
      cwd: __dirname,
      script: ".venv/bin/syncworker",
      args: "run --config syncworker.toml",
      // A console script, not a Node program: PM2 must exec it as is.
      interpreter: "none",
      // PM2 stops with SIGINT, which starts the same drain as SIGTERM. It must
      // wait longer than drain_timeout (300 s by default) plus a few seconds
      // to put cancelled runs back to pending before it sends SIGKILL.
      // Raise both together.
      kill_timeout: 330000,
      // Signal the worker only, not its process tree: PM2's tree-kill would
      // send SIGINT straight to the command steps, which then die before the
      // drain rule lets them finish. The worker stops its step commands' process
      // groups itself.
      treekill: false,
      autorestart: true,
      // No restart_delay or exp_backoff_restart_delay: PM2 7 then marks an
      // exit in stop_exit_codes "waiting restart" forever instead of
      // "stopped". A crash loop is bounded instead: 10 exits within 10 s of
      // their start make the app "errored".
      min_uptime: 10000,
      // 78 is a config error, which a restart cannot fix: stay stopped, with
      // the reason in `pm2 logs`. Any other exit is restarted, 0 included:
      // `pm2 stop` never restarts, so a 0 seen here is a stop PM2 did not
      // ask for (a kill by hand); a step ending the process exits 70.
      stop_exit_codes: [78],
      max_restarts: 10,
      merge_logs: true,
      // structlog already puts an ISO timestamp in every line.
      time: false,
      env: {
        // PM2 captures output through pipes, so "auto" would pick JSON anyway;
        // say it explicitly for log shippers.
        SYNCWORKER_LOG_FORMAT: "json",
        // PM2 files stderr as its error log: every line would look like one.
        SYNCWORKER_LOG_STREAM: "stdout",
      },
    },
  ],
};
