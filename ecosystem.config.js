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
      autorestart: true,
      // Back off while the process keeps crashing, instead of a tight loop.
      exp_backoff_restart_delay: 200,
      // 0: a drain after a stop signal is a clean exit. 78: a config error,
      // which a restart cannot fix.
      stop_exit_codes: [0, 78],
      max_restarts: 50,
      merge_logs: true,
      // structlog already puts an ISO timestamp in every line.
      time: false,
      env: {
        // PM2 captures output through pipes, so "auto" would pick JSON anyway;
        // say it explicitly for log shippers.
        SYNCWORKER_LOG_FORMAT: "json",
      },
    },
  ],
};
