// The benchmark's outputs: the all-in-one CSV (one row per configuration, written and flushed as
// each configuration ends) and the quick mode's llama-bench style table (md, csv or json).
#pragma once

#include <cstdio>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "bench/runner.h"
#include "core/status.h"

namespace kestrel::bench {

// The CSV header: the all-in-one benchmark's columns, then Kestrel's own.
const std::vector<std::string>& csv_columns();
// The fields of one row, in csv_columns() order. Numbers of a configuration that did not run
// are empty.
std::vector<std::string> csv_fields(const CaseResult& result);
// One CSV line (RFC 4180: fields with commas, quotes or line breaks are quoted), with "\n".
std::string csv_line(const std::vector<std::string>& fields);

class CsvWriter {
 public:
  // "-" or "" writes to standard output. The header is written at once.
  static Result<std::unique_ptr<CsvWriter>> open(const std::string& path);
  ~CsvWriter();
  CsvWriter(const CsvWriter&) = delete;
  CsvWriter& operator=(const CsvWriter&) = delete;

  // Writes and flushes one row. Safe to call from the watchdog thread.
  Status write(const CaseResult& result);
  const std::string& path() const { return path_; }

 private:
  CsvWriter() = default;
  Status write_line(const std::string& line);

  std::mutex mutex_;
  std::string path_;
  FILE* file_ = nullptr;
  bool owned_ = false;
};

// One line of the quick mode: a prompt test (ppN) or a generation test (tgN) at one batch size.
struct QuickRow {
  std::string model;
  std::string low_bit;
  double size_gib = 0;  // weights in memory
  double params_b = 0;  // parameters, billions
  std::string backend;
  int threads = 0;
  int64_t batch = 1;
  std::string test;  // "pp512", "tg128"
  bool ok = false;
  std::string status;        // "ok" or the error
  double tps_mean = 0;       // tokens per second of all copies together
  double tps_stddev = 0;     // over trials
  double gbs = -1;           // tg: weights and KV cache read per second; -1: not applicable
  double tflops = -1;        // pp: arithmetic rate; -1: not applicable
  double roofline_pct = -1;  // tg: gbs / the device's bandwidth; pp: tflops / its matrix rate
};

// "md" (a Markdown table like llama-bench's), "csv" or "json" (an array of objects).
Result<std::string> render_quick(const std::vector<QuickRow>& rows, const std::string& format);

}  // namespace kestrel::bench
