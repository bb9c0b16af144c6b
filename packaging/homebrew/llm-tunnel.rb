# Homebrew formula for the desktop side of the LLM tunnel: agentd (the
# agent) and tunnelctl (the operator CLI), built from source with cargo.
#
# This file is the template: packaging/release.sh makes the release source
# archive (llm-tunnel-VERSION.tar.gz, `git archive` of the tagged commit)
# and writes the formula to publish in the tap, with the `url` and `sha256`
# lines below filled in (@VERSION@ and @SHA256@). Then:
#
#   brew install llm-tunnel               # from the tap: the release archive
#   brew install --HEAD ./llm-tunnel.rb   # or the main branch
#   brew services start llm-tunnel
#
# brew does not run on the build machines. CI (packaging/lint.sh) runs
# packaging/release.sh, then packaging/homebrew/formula-test.rb, which loads
# the published formula with a stand-in for brew's Formula DSL, checks the
# archive's sha256, and runs the formula's own `install`, `post_install`,
# `service` and `test do` against the unpacked archive in a temporary prefix.
class LlmTunnel < Formula
  desc "Reverse tunnel for local LLMs: desktop agent and operator CLI"
  homepage "https://example.invalid/llm-tunnel"
  url "https://example.invalid/llm-tunnel/releases/download/v@VERSION@/llm-tunnel-@VERSION@.tar.gz"
  sha256 "@SHA256@"
  license "Apache-2.0"
  head "https://example.invalid/llm-tunnel.git", branch: "main"

  depends_on "rust" => :build

  def install
    system "cargo", "install", *std_cargo_args(path: "agentd")
    system "cargo", "install", *std_cargo_args(path: "tunnelctl")

    # Man pages and completions come from the binaries' own clap definitions.
    (buildpath/"agentd.8").write Utils.safe_popen_read(bin/"agentd", "man")
    (buildpath/"tunnelctl.1").write Utils.safe_popen_read(bin/"tunnelctl", "man")
    man8.install "agentd.8"
    man1.install "tunnelctl.1"
    generate_completions_from_executable(bin/"tunnelctl", "completions", shells: [:bash, :zsh, :fish])

    # The documented example configuration; it works as is (the agent waits
    # for `tunnelctl enroll`). Homebrew keeps an edited etc file on upgrade
    # and writes the new one next to it as agentd.toml.default.
    (etc/"agentd").install "packaging/agentd.toml"
  end

  def post_install
    (var/"lib/agentd").mkpath
    (var/"run").mkpath
    (var/"log").mkpath
  end

  def caveats
    <<~EOS
      agentd keeps its state (the enrolled relay and credential) in
        #{var}/lib/agentd
      and its control socket, for your user only, at
        #{var}/run/agentd/control.sock
      First run, once the service is started (the credential is read from stdin):
        tunnelctl --socket #{var}/run/agentd/control.sock enroll wss://relay.example.com
      or export XDG_RUNTIME_DIR=#{var}/run and leave out --socket.
    EOS
  end

  # launchd (brew services): a per-user agent, restarted whenever it exits.
  # STATE_DIRECTORY and XDG_RUNTIME_DIR stand in for what systemd gives the
  # Linux service (StateDirectory=, RuntimeDirectory=).
  service do
    run [opt_bin/"agentd", "--config", etc/"agentd/agentd.toml"]
    keep_alive true
    environment_variables STATE_DIRECTORY: var/"lib/agentd", XDG_RUNTIME_DIR: var/"run"
    log_path var/"log/agentd.log"
    error_log_path var/"log/agentd.log"
  end

  test do
    assert_match "agentd #{version}", shell_output("#{bin}/agentd --version")
    assert_match "tunnelctl #{version}", shell_output("#{bin}/tunnelctl --version")
    assert_match "enroll", shell_output("#{bin}/tunnelctl --help")
    assert_match ".TH agentd 8", shell_output("#{bin}/agentd man")
    assert_match "tunnelctl", shell_output("#{bin}/tunnelctl completions zsh")
    # The installed configuration loads as shipped (the agent would wait
    # for `tunnelctl enroll`).
    shell_output("#{bin}/agentd --config #{etc}/agentd/agentd.toml --check-config")
  end
end
