# Runs a Homebrew formula's own install, post_install, service and `test do`
# steps against a release archive, without brew (which cannot be installed on
# the build machines):
#
#   ruby packaging/homebrew/formula-test.rb [--workdir DIR] FORMULA ARCHIVE
#
# FORMULA is the formula to publish (packaging/release.sh writes it, with the
# url and sha256 of ARCHIVE filled in). This file is a stand-in for the part
# of brew's Formula DSL the formula uses, written after brew's own code
# (Library/Homebrew/formula.rb, formula_assertions.rb, extend/pathname.rb,
# utils/shell_completion.rb): the same paths (prefix, bin, man8, etc, var,
# opt_bin, the completion directories), the same std_cargo_args, `system`
# that fails the build on a non-zero exit, Pathname#write that will not
# overwrite, Pathname#install that moves files. What it does, in brew's
# order:
#
#   1. loads FORMULA (the real file, unchanged) and checks that its url names
#      ARCHIVE, its version is the archive's Cargo.toml version, and its
#      sha256 is ARCHIVE's;
#   2. unpacks ARCHIVE into a temporary directory and, like brew, runs
#      `install` in its single top-level directory (buildpath), with the
#      keg (prefix) at TMP/prefix/Cellar/llm-tunnel/VERSION and etc and var
#      under TMP/prefix (HOMEBREW_PREFIX); checks every `depends_on ... =>
#      :build` tool is on PATH;
#   3. links TMP/prefix/opt/llm-tunnel to the keg, runs post_install, reads
#      caveats, evaluates the `service do` block and checks the program it
#      runs exists;
#   4. runs the `test do` block in an empty testpath (HOME there too).
#
# What it cannot show: that brew itself (its sandbox, superenv, bottles, the
# macOS toolchain) builds it. It proves the archive is complete and that the
# formula's steps, as written, build and test it.
#
# cargo: CARGO_TARGET_DIR is passed on when set; unset, `cargo install`
# builds everything in a temporary directory (about 10 minutes here). .ci/run
# sets it to the workspace's target directory, so the dependencies built
# there are reused and only the workspace's own crates are compiled from the
# archive. Share a target directory only when its checkout is the archived
# commit (as in CI's clean clone): cargo names a workspace crate's build
# after the crate, not its directory, so a later `cargo build --release` in
# a checkout with older, uncommitted edits can take the archive's build as
# its own.

require "digest"
require "etc"
require "fileutils"
require "open3"
require "pathname"
require "tmpdir"

HARNESS_PREFIX = "formula-test:".freeze

def say(msg)
  $stderr.puts "#{HARNESS_PREFIX} #{msg}"
end

# A failed check or step.
class FormulaTestError < StandardError; end

def check(cond, msg)
  raise FormulaTestError, msg unless cond
end

# brew's Pathname extensions that the formula uses.
class Pathname
  # extend/pathname/write_mkpath_extension.rb: never overwrites.
  alias harness_plain_write write
  def write(content, *args, **kw)
    raise "Will not overwrite #{self}" if exist? && args.empty? && !kw[:mode].to_s.match?(/^a\+?$/)

    dirname.mkpath
    harness_plain_write(content, *args, **kw)
  end

  # extend/pathname.rb: moves each source (relative to the current
  # directory, which is buildpath during install) into this directory.
  def install(*sources)
    sources.each do |src|
      case src
      when Array then src.each { |s| harness_install_p(s, File.basename(s)) }
      when Hash then src.each { |s, new_basename| harness_install_p(s, new_basename) }
      else harness_install_p(src, File.basename(src))
      end
    end
  end

  def harness_install_p(src, new_basename)
    src = Pathname(src)
    raise Errno::ENOENT, src.to_s if !src.symlink? && !src.exist?

    mkpath
    FileUtils.mv src, join(new_basename)
  end
end

module Utils
  # utils/popen.rb: the command's stdout; fails on a non-zero exit.
  def self.safe_popen_read(*args, **_options)
    env = args.first.is_a?(Hash) ? args.shift : {}
    args = args.map(&:to_s)
    say "popen: #{args.join(" ")}"
    out, status = Open3.capture2(env, *args)
    raise FormulaTestError, "#{args.join(" ")} exited #{status.exitstatus}" unless status.success?

    out
  end
end

# The `service do` block's DSL (brew's Homebrew::Service): records what the
# block sets; other names (opt_bin, var, etc) are the formula's.
class StandInService
  attr_reader :settings

  def initialize(formula)
    @formula = formula
    @settings = {}
  end

  %i[run keep_alive environment_variables log_path error_log_path working_dir
     run_type interval cron sockets require_root process_type nice macos_legacy_timers
     restart_delay input_path name].each do |key|
    define_method(key) { |*value| @settings[key] = value.length == 1 ? value.first : value }
  end

  def method_missing(name, *args, &block)
    return @formula.send(name, *args, &block) if @formula.respond_to?(name)

    super
  end

  def respond_to_missing?(name, include_private = false)
    @formula.respond_to?(name) || super
  end
end

# The stand-in for brew's Formula: the class-level DSL records, the instance
# gives the paths and helpers an install and a test use.
class Formula
  class << self
    attr_reader :subclasses_seen

    def inherited(sub)
      super
      (@subclasses_seen ||= []) << sub
    end

    def dsl
      @dsl ||= { depends_on: [] }
    end

    %i[desc homepage url sha256 license head version].each do |key|
      define_method(key) { |*value, **opts| dsl[key] = value.first; dsl[:"#{key}_opts"] = opts }
    end

    def depends_on(spec)
      dsl[:depends_on] << spec
    end

    def service(&block)
      dsl[:service] = block
    end

    def test(&block)
      dsl[:test] = block
    end

    # brew's Version.parse for a "NAME-VERSION.tar.gz" url.
    def version_from_url
      dsl[:version] || dsl[:url].to_s[/-(\d+(?:\.\d+)*)\.tar\.gz\z/, 1]
    end
  end

  attr_reader :homebrew_prefix, :buildpath, :testpath

  def initialize(homebrew_prefix)
    @homebrew_prefix = homebrew_prefix
  end

  attr_writer :buildpath, :testpath

  # LlmTunnel -> llm-tunnel, as brew names a formula after its file.
  def name = self.class.name.gsub(/([a-z\d])([A-Z])/, '\1-\2').downcase
  def version = self.class.version_from_url
  def prefix = homebrew_prefix/"Cellar"/name/version
  def opt_prefix = homebrew_prefix/"opt"/name
  def opt_bin = opt_prefix/"bin"
  def bin = prefix/"bin"
  def sbin = prefix/"sbin"
  def share = prefix/"share"
  def man = share/"man"
  def man1 = man/"man1"
  def man8 = man/"man8"
  def etc = homebrew_prefix/"etc"
  def var = homebrew_prefix/"var"
  def bash_completion = prefix/"etc/bash_completion.d"
  def zsh_completion = share/"zsh/site-functions"
  def fish_completion = share/"fish/vendor_completions.d"

  def std_cargo_args(root: prefix, path: ".", features: nil)
    args = ["--jobs", Etc.nprocessors.to_s, "--locked", "--root=#{root}", "--path=#{path}"]
    args += ["--features=#{Array(features).join(",")}"] if features
    args
  end

  # A failed command fails the build, as in brew.
  def system(cmd, *args)
    argv = [cmd, *args].map(&:to_s)
    say "system: #{argv.join(" ")}"
    raise FormulaTestError, "#{argv.join(" ")} failed (#{$?.exitstatus})" unless Kernel.system(*argv)
  end

  def generate_completions_from_executable(*commands, base_name: nil, shell_parameter_format: nil,
                                           shells: [:bash, :zsh, :fish])
    raise FormulaTestError, "shell_parameter_format #{shell_parameter_format} not in the stand-in" if shell_parameter_format

    executable = commands.first.to_s
    base_name ||= File.basename(executable) if executable.start_with?(bin.to_s, sbin.to_s)
    base_name ||= name
    paths = {
      bash: bash_completion/base_name,
      zsh:  zsh_completion/"_#{base_name}",
      fish: fish_completion/"#{base_name}.fish",
    }
    shells.each do |shell|
      raise FormulaTestError, "completion shell #{shell} not in the stand-in" unless paths.key?(shell)

      paths[shell].dirname.mkpath
      paths[shell].write Utils.safe_popen_read({ "SHELL" => shell.to_s }, *commands, shell.to_s)
    end
  end

  # formula_assertions.rb
  def shell_output(cmd, result = 0)
    say "test: #{cmd}"
    output = `#{cmd}`
    assert_equal result, $?.exitstatus, "exit status of #{cmd}"
    output
  end

  def assert_match(pattern, actual, msg = nil)
    @assertions = (@assertions || 0) + 1
    pattern = Regexp.new(Regexp.escape(pattern)) if pattern.is_a?(String)
    check(pattern.match?(actual), msg || "expected #{pattern.inspect} to match #{actual[0, 400].inspect}")
  end

  def assert_equal(expected, actual, msg = nil)
    @assertions = (@assertions || 0) + 1
    check(expected == actual, "#{msg || "assert_equal"}: expected #{expected.inspect}, got #{actual.inspect}")
  end

  def assert_path_exists(path, msg = nil)
    @assertions = (@assertions || 0) + 1
    check(Pathname(path).exist?, msg || "#{path} does not exist")
  end

  def assert_predicate(obj, method, msg = nil)
    @assertions = (@assertions || 0) + 1
    check(obj.send(method), msg || "expected #{obj} to be #{method}")
  end

  def assertions = @assertions || 0

  def post_install; end

  def caveats = nil
end

# ------------------------------------------------------------------------

# The directory everything happens in: DIR emptied first (a fixed path lets
# cargo reuse its last build of the unpacked workspace in CARGO_TARGET_DIR:
# the archive's files carry the commit's time), else a temporary directory.
def with_workdir(dir, &block)
  return Dir.mktmpdir("formula-test") { |tmp| block.call(Pathname(tmp)) } unless dir

  dir = Pathname(dir).expand_path
  FileUtils.rm_rf(dir)
  dir.mkpath
  block.call(dir)
end

args = ARGV.dup
workdir = nil
if args.first == "--workdir"
  args.shift
  workdir = args.shift
end
formula_file, archive = args
unless formula_file && archive && args.length == 2
  warn "usage: ruby #{$PROGRAM_NAME} [--workdir DIR] FORMULA ARCHIVE"
  exit 64
end
formula_file = Pathname(formula_file).expand_path
archive = Pathname(archive).expand_path
started = Time.now

begin
  load formula_file.to_s
  klass = Formula.subclasses_seen&.last
  check(klass, "#{formula_file} defines no Formula subclass")
  dsl = klass.dsl
  say "loaded #{formula_file}: class #{klass}, url #{dsl[:url]}"

  # 1. The formula names this archive, its version and its checksum.
  check(dsl[:url].is_a?(String) && !dsl[:url].include?("@"), "no url filled in (run packaging/release.sh)")
  check(File.basename(dsl[:url]) == archive.basename.to_s,
        "the url names #{File.basename(dsl[:url])}, the archive is #{archive.basename}")
  actual = Digest::SHA256.file(archive).hexdigest
  check(dsl[:sha256] == actual, "sha256 in the formula #{dsl[:sha256]}, of #{archive.basename} #{actual}")
  say "sha256 matches: #{actual}"

  with_workdir(workdir) do |tmp|
    formula = klass.new(tmp/"prefix")
    version = formula.version
    check(version, "no version in the url #{dsl[:url]}")

    # 2. Unpack; brew builds in the archive's single top-level directory.
    unpack = tmp/"unpack"
    unpack.mkpath
    say "tar -xzf #{archive} -C #{unpack}"
    check(Kernel.system("tar", "-xzf", archive.to_s, "-C", unpack.to_s), "tar could not unpack #{archive}")
    tops = unpack.children
    check(tops.length == 1 && tops.first.directory?, "the archive must hold one top-level directory, not #{tops.map(&:basename)}")
    formula.buildpath = tops.first
    # The unpacked files get the current time: cargo names a workspace
    # crate's build after the crate, not its directory, so with a shared
    # CARGO_TARGET_DIR a build of the same crates from another checkout
    # would otherwise count as fresh, and the archive's sources would not
    # be compiled at all.
    now = Time.now
    formula.buildpath.glob("**/*", File::FNM_DOTMATCH).each { |f| File.utime(now, now, f) unless f.symlink? }
    cargo_version = (formula.buildpath/"Cargo.toml").read[/^\[workspace\.package\].*?^version = "([^"]+)"/m, 1]
    check(cargo_version == version, "the url's version #{version}, the archive's Cargo.toml #{cargo_version}")
    say "version #{version} (url and the archive's Cargo.toml agree)"
    dsl[:depends_on].each do |dep|
      tool, kind = dep.is_a?(Hash) ? dep.first : [dep, nil]
      cmd = tool == "rust" ? "cargo" : tool
      check(Kernel.system("command -v #{cmd} >/dev/null"), "depends_on #{tool} (#{kind || "runtime"}): no #{cmd} on PATH")
      say "depends_on #{tool.inspect}#{kind ? " => #{kind.inspect}" : ""}: #{cmd} found"
    end
    say "CARGO_TARGET_DIR=#{ENV.fetch("CARGO_TARGET_DIR", "(unset: cargo install builds in a temporary directory)")}"
    say "install: in #{formula.buildpath}, prefix #{formula.prefix}"
    t = Time.now
    Dir.chdir(formula.buildpath) { formula.install }
    say format("install: done in %.0f s", Time.now - t)
    installed = formula.prefix.glob("**/*").select(&:file?).map { |f| f.relative_path_from(formula.prefix).to_s }.sort
    say "the keg holds: #{installed.join(", ")}"
    %w[bin/agentd bin/tunnelctl share/man/man8/agentd.8 share/man/man1/tunnelctl.1
       etc/bash_completion.d/tunnelctl share/zsh/site-functions/_tunnelctl
       share/fish/vendor_completions.d/tunnelctl.fish].each do |f|
      check(installed.include?(f), "the keg lacks #{f}")
    end
    check((formula.etc/"agentd/agentd.toml").file?, "#{formula.etc}/agentd/agentd.toml not installed")
    say "etc: #{formula.etc}/agentd/agentd.toml"

    # 3. Link opt, post_install, caveats, the service block.
    formula.opt_prefix.dirname.mkpath
    File.symlink(formula.prefix, formula.opt_prefix)
    formula.post_install
    %w[lib/agentd run log].each { |d| check((formula.var/d).directory?, "post_install did not make var/#{d}") }
    caveats = formula.caveats.to_s
    check(caveats.include?((formula.var/"lib/agentd").to_s), "the caveats do not name the state directory")
    say "post_install and caveats: ok"
    if dsl[:service]
      svc = StandInService.new(formula)
      svc.instance_exec(&dsl[:service])
      run = Array(svc.settings[:run]).map(&:to_s)
      check(!run.empty?, "the service block runs nothing")
      check(File.executable?(run.first), "the service runs #{run.first}, which is not an installed executable")
      run.each_cons(2) do |flag, value|
        check(File.file?(value), "the service's #{flag} #{value} does not exist") if flag == "--config"
      end
      say "service: #{run.join(" ")} (#{svc.settings.keys.join(", ")})"
    end

    # 4. test do, in an empty testpath that is also HOME.
    check(dsl[:test], "the formula has no test do block")
    testpath = tmp/"testpath"
    testpath.mkpath
    formula.testpath = testpath
    saved_env = ENV.to_h
    begin
      ENV["HOME"] = testpath.to_s
      Dir.chdir(testpath) { formula.instance_exec(&dsl[:test]) }
    ensure
      ENV.replace(saved_env)
    end
    check(formula.assertions.positive?, "the test do block asserted nothing")
    say "test do: #{formula.assertions} assertions passed"
  end
  say format("PASSED: %s %s from %s: the formula's own install, post_install, service and test do (%.0f s)",
             klass, klass.version_from_url, archive.basename, Time.now - started)
rescue FormulaTestError, RuntimeError, SystemCallError => e
  say "FAILED: #{e.message}"
  exit 1
end
