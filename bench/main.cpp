// tiny-kernel: the command-line tool. `tiny-kernel bench` measures the
// machine's bandwidth and compute roofs, then times every kernel against them
// and against its baseline, printing a table (stdout), progress (stderr) and
// optionally JSON.
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <memory>
#include <regex>
#include <stdexcept>
#include <string>
#include <vector>

#include "bench.h"
#include "cases.h"

namespace tkb {

namespace {
thread_local std::string g_op_error;
}
void set_op_error(std::string message) { g_op_error = std::move(message); }
std::string op_error() {
  if (!g_op_error.empty()) return g_op_error;
  const char* e = tk_last_error();
  return e && *e ? e : "failed with no message";
}

namespace {

const char* kUsage =
    "usage: tiny-kernel bench [--backend cpu|cuda|reference] [--filter REGEX] [--json FILE]\n"
    "                         [--threads N] [--quick] [--full] [--list] [--flush read|memset]\n"
    "\n"
    "  --backend   default: CUDA when built in and a GPU is present, else the CPU\n"
    "  --filter    run the rows whose \"kernel shape dtype\" matches REGEX (ECMAScript,\n"
    "              searched anywhere); the decode step's name is decode_step\n"
    "  --json      also write the results to FILE\n"
    "  --threads   CPU worker threads (default: all)\n"
    "  --quick     fewer repeats per row\n"
    "  --full      run the giant prefill rows on the CPU too (minutes each)\n"
    "  --list      print the rows and exit\n"
    "  --flush     GPU L2 flush before each repeat: a read pass over 256 MB (default) or\n"
    "              a 256 MB memset as Triton's do_bench (the issues' anchors) does, which\n"
    "              leaves dirty lines to be written back inside the timed kernel\n";

struct Args {
  std::string backend;
  std::string filter;
  std::string json;
  int threads = 0;
  bool quick = false, full = false, list = false, memset_flush = false;
};

[[noreturn]] void usage_error(const std::string& msg) {
  std::fprintf(stderr, "tiny-kernel: %s\n\n%s", msg.c_str(), kUsage);
  std::exit(2);
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 2; i < argc; ++i) {
    const std::string s = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage_error(s + " needs a value");
      return argv[++i];
    };
    if (s == "--backend") a.backend = value();
    else if (s == "--filter") a.filter = value();
    else if (s == "--json") a.json = value();
    else if (s == "--threads") a.threads = std::atoi(value().c_str());
    else if (s == "--quick") a.quick = true;
    else if (s == "--full") a.full = true;
    else if (s == "--list") a.list = true;
    else if (s == "--flush") {
      const std::string v = value();
      if (v != "read" && v != "memset") usage_error("--flush takes read or memset, not " + v);
      a.memset_flush = v == "memset";
    }
    else if (s == "-h" || s == "--help") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    } else usage_error("unknown option " + s);
  }
  return a;
}

std::string fmt(const char* f, double v) {
  char b[64];
  std::snprintf(b, sizeof b, f, v);
  return b;
}

std::string fmt_time(double us) {
  if (us < 10) return fmt("%.2f us", us);
  if (us < 1000) return fmt("%.1f us", us);
  if (us < 1e6) return fmt("%.3f ms", us / 1e3);
  return fmt("%.2f s", us / 1e6);
}

std::string json_str(const std::string& s) {
  std::string o = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      o += '\\';
      o += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char b[8];
      std::snprintf(b, sizeof b, "\\u%04x", c);
      o += b;
    } else {
      o += c;
    }
  }
  return o + "\"";
}
std::string json_num(double v, bool valid = true) {
  if (!valid || !std::isfinite(v)) return "null";
  return fmt("%.6g", v);
}

struct BaselineResult {
  std::string name;
  Measurement m;
};

struct Row {
  const Case* c;
  Measurement m;
  std::vector<BaselineResult> baselines;
  double target_us = 0;
  std::string error;  // setup failure or skip reason
};

struct Columns {
  bool gflops;  // CPU: GFLOP/s; GPU: TFLOP/s
};

void print_header(const Columns& col) {
  std::printf("%-17s %-34s %-5s %11s %8s %8s %9s  %-19s %s\n", "kernel", "shape", "dtype", "median",
              "GB/s", col.gflops ? "GFLOP/s" : "TFLOP/s", "% roof", "target", "baseline");
  std::printf("%s\n", std::string(140, '-').c_str());
}

// Fraction of the roofline: the time the roofs allow over the time taken.
double roof_fraction(const Case& c, const Measurement& m, const Peaks& pk, bool* memory_bound) {
  const double t_mem = c.bytes > 0 ? c.bytes / (pk.gbps(c.traffic) * 1e9) : 0;
  const double t_fp = c.flops > 0 && pk.peak_tflops > 0 ? c.flops / (pk.peak_tflops * 1e12) : 0;
  *memory_bound = t_mem >= t_fp;
  return std::max(t_mem, t_fp) / (m.median_us * 1e-6);
}

void print_row(const Row& r, const Peaks& pk, const Columns& col) {
  const Case& c = *r.c;
  std::printf("%-17s %-34s %-5s ", c.kernel.c_str(), c.shape.c_str(), c.dtype.c_str());
  if (!r.error.empty()) {
    std::printf("%s\n", r.error.c_str());
    return;
  }
  if (!r.m.ok) {
    std::printf("not run: %s", r.m.error.c_str());
  } else {
    const double s = r.m.median_us * 1e-6;
    bool mem = true;
    const double roof = roof_fraction(c, r.m, pk, &mem);
    std::string tgt = "-";
    if (r.target_us > 0)
      tgt = "<=" + fmt_time(r.target_us) + (r.m.median_us <= r.target_us ? " ok" : " MISS");
    std::printf("%11s %8s %8s %5.0f%% %-3s  %-19s ", fmt_time(r.m.median_us).c_str(),
                c.bytes > 0 ? fmt("%.1f", c.bytes / s / 1e9).c_str() : "-",
                c.flops > 0 ? fmt(col.gflops ? "%.1f" : "%.2f",
                                  c.flops / s / (col.gflops ? 1e9 : 1e12)).c_str()
                            : "-",
                roof * 100, mem ? "mem" : "fp", tgt.c_str());
  }
  if (r.baselines.empty() && r.m.ok) std::printf("-");
  for (size_t i = 0; i < r.baselines.size(); ++i) {
    const BaselineResult& b = r.baselines[i];
    std::printf("%s", i ? "; " : r.m.ok ? "" : " | baseline ");
    if (!b.m.ok) {
      std::printf("%s: not run (%s)", b.name.c_str(), b.m.error.c_str());
    } else if (r.m.ok) {
      std::printf("%s %s -> %.2fx", b.name.c_str(), fmt_time(b.m.median_us).c_str(),
                  b.m.median_us / r.m.median_us);
    } else {
      std::printf("%s %s", b.name.c_str(), fmt_time(b.m.median_us).c_str());
    }
  }
  std::printf("\n");
}

std::string row_json(const Row& r, const Peaks& pk) {
  const Case& c = *r.c;
  const bool ok = r.error.empty() && r.m.ok;
  const double s = r.m.median_us * 1e-6;
  bool mem = true;
  const double roof = ok ? roof_fraction(c, r.m, pk, &mem) : 0;
  std::string j = "{\"kernel\": " + json_str(c.kernel) + ", \"shape\": " + json_str(c.shape) +
                  ", \"dtype\": " + json_str(c.dtype) +
                  ", \"median_us\": " + json_num(r.m.median_us, ok) +
                  ", \"gbps\": " + json_num(c.bytes / s / 1e9, ok && c.bytes > 0) +
                  ", \"tflops\": " + json_num(c.flops / s / 1e12, ok && c.flops > 0) +
                  ", \"pct_peak\": " + json_num(roof * 100, ok) +
                  ", \"roof_gbps\": " + json_num(pk.gbps(c.traffic)) +
                  ", \"bound\": " + (ok ? json_str(mem ? "memory" : "compute") : "null");
  const BaselineResult* first = r.baselines.empty() ? nullptr : &r.baselines[0];
  j += ", \"baseline\": " + (first ? json_str(first->name) : "null");
  j += ", \"baseline_us\": " + json_num(first ? first->m.median_us : 0, first && first->m.ok);
  j += ", \"baselines\": [";
  for (size_t i = 0; i < r.baselines.size(); ++i) {
    const BaselineResult& b = r.baselines[i];
    j += std::string(i ? ", " : "") + "{\"name\": " + json_str(b.name) +
         ", \"median_us\": " + json_num(b.m.median_us, b.m.ok) +
         (b.m.ok ? "" : ", \"error\": " + json_str(b.m.error)) + "}";
  }
  j += "], \"target_us\": " + json_num(r.target_us, r.target_us > 0);
  j += ", \"reps\": " + std::to_string(ok ? r.m.reps : 0);
  if (!r.error.empty()) j += ", \"error\": " + json_str(r.error);
  else if (!r.m.ok) j += ", \"error\": " + json_str(r.m.error);
  return j + "}";
}

int bench(const Args& args) {
  std::regex filter;
  try {
    filter = std::regex(args.filter.empty() ? std::string(".") : args.filter);
  } catch (const std::regex_error& e) {
    usage_error("bad --filter regex: " + std::string(e.what()));
  }
  tk_backend kind = TK_BACKEND_DEFAULT;
  if (args.backend == "cpu") kind = TK_BACKEND_CPU;
  else if (args.backend == "cuda") kind = TK_BACKEND_CUDA;
  else if (args.backend == "reference") kind = TK_BACKEND_REFERENCE;
  else if (!args.backend.empty()) usage_error("unknown backend " + args.backend);

  tk_context* ctx = nullptr;
  if (tk_context_create(kind, 0, &ctx) != TK_OK) {
    std::fprintf(stderr, "tiny-kernel bench: cannot open the %s backend: %s\n",
                 args.backend.empty() ? "default" : args.backend.c_str(), tk_last_error());
    return 1;
  }
  std::unique_ptr<tk_context, void (*)(tk_context*)> guard(ctx, tk_context_destroy);
  if (args.threads > 0 && tk_context_set_threads(ctx, args.threads) != TK_OK) {
    std::fprintf(stderr, "tiny-kernel bench: %s\n", tk_last_error());
    return 1;
  }
  const bool cuda = tk_context_backend(ctx) == TK_BACKEND_CUDA;
  std::unique_ptr<Device> dev;
  if (cuda) {
#if defined(TK_HAVE_CUDA)
    std::string err;
    dev = make_cuda_device(ctx, &err);
    if (!dev) {
      std::fprintf(stderr, "tiny-kernel bench: %s\n", err.c_str());
      return 1;
    }
#endif
  } else {
    dev = make_host_device(ctx, args.threads);
  }

  CaseOptions copt;
  copt.ctx = ctx;
  copt.device = dev.get();
  copt.cuda = cuda;
  copt.full = args.full;
  std::vector<Case> all = make_cases(copt);
  std::vector<const Case*> cases;
  for (const Case& c : all)
    if (std::regex_search(c.kernel + " " + c.shape + " " + c.dtype, filter)) cases.push_back(&c);
  const bool run_step = std::regex_search(std::string("decode_step"), filter);
  if (args.list) {
    for (const Case* c : cases)
      std::printf("%-17s %-34s %-5s%s\n", c->kernel.c_str(), c->shape.c_str(), c->dtype.c_str(),
                  c->skip.empty() ? "" : "  (skipped here)");
    if (run_step) std::printf("decode_step\n");
    return 0;
  }

  TimingOptions topt;
  topt.memset_flush = args.memset_flush;
  if (cuda) {
    topt.budget_s = args.quick ? 0.05 : 0.3;
    topt.min_reps = args.quick ? 5 : 20;
    topt.max_reps = args.quick ? 50 : 300;
  } else {
    topt.budget_s = args.quick ? 0.25 : 1.0;
    topt.min_reps = args.quick ? 3 : 5;
    topt.max_reps = args.quick ? 30 : 200;
  }

  // Roofs before and after the rows (on the CPU also after every row), the
  // best of each kept: a neighbour's burst during one measurement (a shared
  // machine) does not lower the roof and inflate every %.
  std::fprintf(stderr, "bench: measuring the roofs on %s...\n", tk_context_device_name(ctx));
  Peaks pk = dev->measure_peaks();
  int roof_samples = 1;
  auto remeasure = [&] {
    const Peaks again = dev->measure_peaks();
    ++roof_samples;
    pk.read_gbps = std::max(pk.read_gbps, again.read_gbps);
    pk.copy_gbps = std::max(pk.copy_gbps, again.copy_gbps);
    pk.update_gbps = std::max(pk.update_gbps, again.update_gbps);
    pk.peak_gbps = std::max(pk.peak_gbps, again.peak_gbps);
    pk.peak_tflops = std::max(pk.peak_tflops, again.peak_tflops);
    if (again.launch_us > 0 && (pk.launch_us == 0 || again.launch_us < pk.launch_us))
      pk.launch_us = again.launch_us;
  };

  std::vector<Row> rows;
  int index = 0;
  for (const Case* c : cases) {
    ++index;
    std::fprintf(stderr, "bench: [%d/%zu] %s %s %s: ", index, cases.size(), c->kernel.c_str(),
                 c->shape.c_str(), c->dtype.c_str());
    Row r;
    r.c = c;
    if (!c->skip.empty()) {
      r.error = "skipped: " + c->skip;
    } else {
      // One buffer set, then as many more as the device wants to rotate among.
      std::vector<Instance> sets;
      std::vector<Device::Region> regions;
      try {
        size_t want = 1;
        while (sets.size() < want) {
          Instance in;
          in.arena = std::make_unique<Arena>(ctx);
          c->setup(in);
          const auto reg = in.arena->regions();
          regions.insert(regions.end(), reg.begin(), reg.end());
          if (sets.empty()) {
            size_t bytes = 0;
            for (const auto& x : reg) bytes += x.bytes;
            want = dev->rotation_sets(bytes);
          }
          sets.push_back(std::move(in));
        }
      } catch (const std::exception& e) {
        r.error = std::string("setup failed: ") + e.what();
      }
      if (r.error.empty()) {
        dev->set_working_set(regions);
        std::vector<Op> ops;
        for (const Instance& in : sets) ops.push_back(in.op);
        r.m = dev->time_sets(ops, topt);
        for (size_t b = 0; b < sets[0].baselines.size(); ++b) {
          const Baseline& base = sets[0].baselines[b];
          ops.clear();
          for (const Instance& in : sets) ops.push_back(in.baselines[b].op);
          if (base.in_cache) ops.resize(1);
          TimingOptions bopt = topt;
          bopt.flush = !base.in_cache;
          r.baselines.push_back({base.name, dev->time_sets(ops, bopt)});
        }
        dev->set_working_set({});
        if (!cuda) remeasure();  // the CPU's bandwidth wanders by tens of % on a shared VM
      }
    }
    std::fprintf(stderr, "%s\n", !r.error.empty() ? r.error.c_str()
                                 : r.m.ok         ? fmt_time(r.m.median_us).c_str()
                                                  : ("not run: " + r.m.error).c_str());
    rows.push_back(std::move(r));
  }

  // One decoder layer's worth of fused calls, one by one and as a CUDA graph.
  std::string step_json = "null", step_text;
  if (run_step) {
    std::fprintf(stderr, "bench: decode step\n");
    std::unique_ptr<Sequence> seq;
    std::string err;
    try {
      seq = make_decode_step(copt);
    } catch (const std::exception& e) {
      err = std::string("setup failed: ") + e.what();
    }
    step_text = "\nDecode step";
    Measurement eager, graph;
    int nodes = 0;
    std::string names, missing;
    if (seq) {
      // Calls that fail on this backend are left out and named, so the graph
      // machinery is measured while kernels are still landing.
      std::vector<Op> ops;
      for (auto& [name, op] : seq->ops) {
        set_op_error("");
        tk_status st = op();
        if (st == TK_OK) st = tk_check_device_errors(ctx);
        if (st != TK_OK) {
          missing += (missing.empty() ? "" : "; ") + name + " (" + op_error() + ")";
          continue;
        }
        ops.push_back(op);
        names += (names.empty() ? "" : ", ") + name;
      }
      step_text += " (" + seq->shape + "): " + (names.empty() ? "no call runs" : names) + "\n";
      if (!missing.empty())
        step_text += "  PARTIAL, " + std::to_string(ops.size()) + " of " +
                     std::to_string(seq->ops.size()) + " calls; left out: " + missing + "\n";
      TimingOptions sopt = topt;
      sopt.sync_each = true;
      if (!ops.empty()) {
        dev->set_working_set(seq->arena->regions());
        dev->time_sequence(ops, sopt, &eager, &graph, &nodes);
        dev->set_working_set({});
      } else {
        err = "no call of the decode step runs here";
        eager.error = graph.error = err;
      }
      step_text += "  one call after another  " +
                   (eager.ok ? fmt_time(eager.median_us) : "not run: " + eager.error) + "\n";
      if (graph.ok)
        step_text += "  one CUDA graph          " + fmt_time(graph.median_us) + " (" +
                     std::to_string(nodes) + " nodes) -> " +
                     fmt("%.2fx", eager.ok ? eager.median_us / graph.median_us : 0.0) + "\n";
      else
        step_text += "  one CUDA graph          not run: " + graph.error + "\n";
    } else {
      step_text += ": " + err + "\n";
    }
    step_json = "{\"shape\": " + json_str(seq ? seq->shape : "") +
                ", \"calls\": " + json_str(names) + ", \"left_out\": " + json_str(missing) +
                ", \"eager_us\": " + json_num(eager.median_us, eager.ok) +
                ", \"graph_us\": " + json_num(graph.median_us, graph.ok) +
                ", \"graph_nodes\": " + std::to_string(nodes) +
                ", \"error\": " +
                (!err.empty() ? json_str(err)
                              : !eager.ok ? json_str(eager.error)
                                          : !graph.ok ? json_str(graph.error) : "null") +
                "}";
  }

  std::fprintf(stderr, "bench: measuring the roofs again...\n");
  remeasure();
  for (Row& r : rows)
    if (r.c->target_us) r.target_us = r.c->target_us(pk);

  std::printf("tiny-kernel bench\n");
  std::printf("Device: %s (%s backend)\n", tk_context_device_name(ctx), dev->backend());
  std::printf("Memory: read %.1f GB/s, copy %.1f GB/s (read + write)", pk.read_gbps, pk.copy_gbps);
  if (pk.update_gbps > 0) std::printf(", in-place update %.1f GB/s (read + write)", pk.update_gbps);
  std::printf("\n        roofs: %.1f GB/s for kernels that only read, %.1f for those writing a separate "
              "output, %.1f in place\n",
              pk.gbps(Traffic::kRead), pk.gbps(Traffic::kReadWrite), pk.gbps(Traffic::kInPlace));
  std::printf("Compute: %.3f TFLOP/s\n", pk.peak_tflops);
  if (pk.launch_us > 0)
    std::printf("Launch floor: an empty kernel takes %.2f us, timed as every row is\n",
                pk.launch_us);
  std::printf("(%s; best of %d measurements, %s; GB = 1e9 bytes; median of repeats, %s "
              "before each)\n",
              pk.how.c_str(), roof_samples,
              cuda ? "before and after the rows" : "before the rows and after each",
              !cuda ? "caches flushed"
              : args.memset_flush ? "L2 flushed by a 256 MB memset (dirty lines)"
                                  : "L2 flushed by a 256 MB read pass");
  std::printf("%s\n", std::string(140, '=').c_str());
  const Columns col{!cuda};
  print_header(col);
  for (const Row& r : rows) print_row(r, pk, col);
  std::printf("%s", step_text.c_str());
  std::printf("\nDone.\n");
  std::fflush(stdout);

  if (!args.json.empty()) {
    FILE* f = std::fopen(args.json.c_str(), "w");
    if (!f) {
      std::fprintf(stderr, "tiny-kernel bench: cannot write %s: %s\n", args.json.c_str(),
                   std::strerror(errno));
      return 1;
    }
    char date[32];
    const std::time_t now = std::time(nullptr);
    std::strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
    std::fprintf(f,
                 "{\n  \"date\": %s,\n  \"device\": {\"backend\": %s, \"name\": %s, "
                 "\"peak_gbps\": %s, \"peak_tflops\": %s, \"read_gbps\": %s, \"copy_gbps\": %s, "
                 "\"update_gbps\": %s, \"launch_us\": %s, "
                 "\"how\": %s, \"flush\": %s},\n  \"results\": [\n",
                 json_str(date).c_str(), json_str(dev->backend()).c_str(),
                 json_str(tk_context_device_name(ctx)).c_str(), json_num(pk.peak_gbps).c_str(),
                 json_num(pk.peak_tflops, pk.peak_tflops > 0).c_str(),
                 json_num(pk.read_gbps).c_str(), json_num(pk.copy_gbps).c_str(),
                 json_num(pk.update_gbps, pk.update_gbps > 0).c_str(),
                 json_num(pk.launch_us, pk.launch_us > 0).c_str(), json_str(pk.how).c_str(),
                 json_str(!cuda ? "caches" : args.memset_flush ? "memset" : "read").c_str());
    for (size_t i = 0; i < rows.size(); ++i)
      std::fprintf(f, "    %s%s\n", row_json(rows[i], pk).c_str(), i + 1 < rows.size() ? "," : "");
    std::fprintf(f, "  ],\n  \"decode_step\": %s\n}\n", step_json.c_str());
    std::fclose(f);
    std::fprintf(stderr, "bench: wrote %s\n", args.json.c_str());
  }
  return 0;
}

}  // namespace
}  // namespace tkb

int main(int argc, char** argv) {
  if (argc < 2 || std::strcmp(argv[1], "-h") == 0 || std::strcmp(argv[1], "--help") == 0) {
    std::fputs(tkb::kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  if (std::strcmp(argv[1], "bench") != 0) tkb::usage_error(std::string("unknown command ") + argv[1]);
  return tkb::bench(tkb::parse(argc, argv));
}
