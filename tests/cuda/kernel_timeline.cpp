#include "kernel_timeline.h"

#include <cxxabi.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>

#include <cuda_runtime.h>

#if KESTREL_HAVE_CUPTI
#include <cupti.h>
#endif

namespace kestrel::cuda_test {
namespace {

#if KESTREL_HAVE_CUPTI
// A kernel's demangled name without namespaces and parameter list:
// "gemv_kernel<(WeightFormat)4, 1, 1, false, true, 1>".
std::string short_name(const char* mangled) {
  if (mangled == nullptr) return "?";
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> demangled(
      abi::__cxa_demangle(mangled, nullptr, nullptr, &status), std::free);
  std::string name = status == 0 && demangled ? demangled.get() : mangled;
  for (const std::string& prefix : {std::string("(anonymous namespace)::"),
                                    std::string("kestrel::cuda::"), std::string("kestrel::")}) {
    for (size_t at = name.find(prefix); at != std::string::npos; at = name.find(prefix)) {
      name.erase(at, prefix.size());
    }
  }
  int depth = 0;  // drop the parameter list: the first '(' outside the template arguments
  for (size_t i = 0; i < name.size(); ++i) {
    if (name[i] == '<') ++depth;
    if (name[i] == '>') --depth;
    if (name[i] == '(' && depth == 0 && i > 0) return name.substr(0, i);
  }
  return name;
}

std::mutex spans_mutex;
std::vector<KernelSpan> recorded;
std::vector<KernelSpan> recorded_activities;  // runtime API calls, copies and fills
bool activities_enabled = false;
constexpr CUpti_ActivityKind kActivityKinds[] = {
    CUPTI_ACTIVITY_KIND_RUNTIME, CUPTI_ACTIVITY_KIND_MEMCPY, CUPTI_ACTIVITY_KIND_MEMSET};
constexpr size_t kBufferBytes = size_t(8) << 20;

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *size = kBufferBytes;
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kBufferBytes));
  *max_records = 0;  // as many as fit
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  CUpti_Activity* record = nullptr;
  {
    std::lock_guard<std::mutex> lock(spans_mutex);
    while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
      if (record->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) {
        const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(record);
        recorded.push_back(KernelSpan{short_name(k->name), k->start, k->end,
                                      int64_t(k->gridX) * k->gridY * k->gridZ});
      } else if (record->kind == CUPTI_ACTIVITY_KIND_RUNTIME) {
        const auto* a = reinterpret_cast<const CUpti_ActivityAPI*>(record);
        const char* name = nullptr;
        cuptiGetCallbackName(CUPTI_CB_DOMAIN_RUNTIME_API, a->cbid, &name);
        recorded_activities.push_back(
            KernelSpan{std::string("api ") + (name != nullptr ? name : "?"), a->start, a->end, 0});
      } else if (record->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
        const auto* m = reinterpret_cast<const CUpti_ActivityMemcpy6*>(record);
        recorded_activities.push_back(KernelSpan{"memcpy kind " + std::to_string(m->copyKind),
                                                 m->start, m->end, int64_t(m->bytes)});
      } else if (record->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
        const auto* m = reinterpret_cast<const CUpti_ActivityMemset4*>(record);
        recorded_activities.push_back(KernelSpan{"memset", m->start, m->end, int64_t(m->bytes)});
      }
    }
  }
  std::free(buffer);
}

// Takes what the recording callback gathered in `from`, ordered by start.
std::vector<KernelSpan> take_sorted(std::vector<KernelSpan>& from) {
  std::vector<KernelSpan> spans;
  {
    std::lock_guard<std::mutex> lock(spans_mutex);
    spans.swap(from);
  }
  std::stable_sort(spans.begin(), spans.end(), [](const KernelSpan& a, const KernelSpan& b) {
    return a.start_ns < b.start_ns;
  });
  return spans;
}

Status cupti_status(const char* what, CUptiResult r) {
  if (r == CUPTI_SUCCESS) return Status::ok();
  const char* text = nullptr;
  cuptiGetResultString(r, &text);
  return Status::error(std::string("kernel timeline: ") + what + ": " +
                       (text != nullptr ? text : "unknown CUPTI error"));
}
#endif

}  // namespace

Status timeline_start(bool activities) {
#if KESTREL_HAVE_CUPTI
  static bool registered = false;
  if (!registered) {
    KS_RETURN_IF_ERROR(cupti_status(
        "register buffers", cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed)));
    registered = true;
  }
  {
    std::lock_guard<std::mutex> lock(spans_mutex);
    recorded.clear();
    recorded_activities.clear();
  }
  activities_enabled = activities;
  if (activities) {
    for (CUpti_ActivityKind kind : kActivityKinds) {
      KS_RETURN_IF_ERROR(cupti_status("enable activity records", cuptiActivityEnable(kind)));
    }
  }
  return cupti_status("enable kernel records",
                      cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL));
#else
  (void)activities;
  return Status::error("kernel timeline: this build has no CUPTI (CUDA::cupti was not found)");
#endif
}

Result<std::vector<KernelSpan>> timeline_stop() {
#if KESTREL_HAVE_CUPTI
  const cudaError_t err = cudaDeviceSynchronize();
  if (err != cudaSuccess) {
    return Status::error(std::string("kernel timeline: ") + cudaGetErrorString(err));
  }
  KS_RETURN_IF_ERROR(
      cupti_status("flush", cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED)));
  KS_RETURN_IF_ERROR(cupti_status("disable kernel records",
                                  cuptiActivityDisable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL)));
  if (activities_enabled) {
    for (CUpti_ActivityKind kind : kActivityKinds) {
      KS_RETURN_IF_ERROR(cupti_status("disable activity records", cuptiActivityDisable(kind)));
    }
    activities_enabled = false;
  }
  return take_sorted(recorded);
#else
  return Status::error("kernel timeline: this build has no CUPTI (CUDA::cupti was not found)");
#endif
}

std::vector<KernelSpan> timeline_activities() {
#if KESTREL_HAVE_CUPTI
  return take_sorted(recorded_activities);
#else
  return {};
#endif
}

std::vector<std::vector<KernelSpan>> split_steps(const std::vector<KernelSpan>& spans) {
  std::vector<std::vector<KernelSpan>> steps;
  if (spans.empty()) return steps;
  const std::string& last = spans.back().name;
  std::vector<KernelSpan> current;
  for (const KernelSpan& k : spans) {
    current.push_back(k);
    if (k.name == last) {
      steps.push_back(std::move(current));
      current.clear();
    }
  }
  return steps;
}

Result<StepTimeline> step_timeline(const std::vector<KernelSpan>& spans) {
  if (spans.empty()) return Status::error("kernel timeline: a step without kernels");
  StepTimeline step;
  const uint64_t t0 = spans.front().start_ns;
  uint64_t latest_end = t0;  // the latest end so far: the first kernel adds its duration
  for (const KernelSpan& k : spans) {
    StepKernel sk;
    sk.span = &k;
    sk.start_us = double(k.start_ns - t0) / 1e3;
    sk.duration_us = double(k.end_ns - k.start_ns) / 1e3;
    sk.adds_us = k.end_ns > latest_end ? double(k.end_ns - latest_end) / 1e3 : 0.0;
    latest_end = std::max(latest_end, k.end_ns);
    step.kernel_sum_us += sk.duration_us;
    step.kernels.push_back(sk);
  }
  step.span_us = double(latest_end - t0) / 1e3;
  return step;
}

std::vector<KernelGroup> group_kernels(const StepTimeline& step) {
  std::vector<KernelGroup> groups;
  for (const StepKernel& k : step.kernels) {
    auto it = std::find_if(groups.begin(), groups.end(), [&](const KernelGroup& g) {
      return g.name == k.span->name && g.blocks == k.span->blocks;
    });
    if (it == groups.end()) {
      groups.push_back(KernelGroup{k.span->name, k.span->blocks});
      it = groups.end() - 1;
    }
    ++it->count;
    it->duration_us += k.duration_us;
    it->adds_us += k.adds_us;
  }
  return groups;
}

std::string chrome_trace(const StepTimeline& step) {
  std::string out = "{\"traceEvents\":[\n";
  std::vector<double> row_end;  // overlapping kernels go on separate rows
  char line[512];
  for (size_t i = 0; i < step.kernels.size(); ++i) {
    const StepKernel& k = step.kernels[i];
    size_t row = 0;
    while (row < row_end.size() && row_end[row] > k.start_us) ++row;
    if (row == row_end.size()) row_end.push_back(0);
    row_end[row] = k.start_us + k.duration_us;
    std::string name;
    for (char c : k.span->name) name += c == '"' || c == '\\' ? '\'' : c;
    std::snprintf(line, sizeof(line),
                  "%s{\"name\":\"%s\",\"ph\":\"X\",\"pid\":0,\"tid\":%zu,\"ts\":%.3f,\"dur\":%.3f,"
                  "\"args\":{\"blocks\":%lld,\"adds_us\":%.3f}}",
                  i == 0 ? "" : ",\n", name.substr(0, 200).c_str(), row, k.start_us, k.duration_us,
                  static_cast<long long>(k.span->blocks), k.adds_us);
    out += line;
  }
  out += "\n]}\n";
  return out;
}

}  // namespace kestrel::cuda_test
