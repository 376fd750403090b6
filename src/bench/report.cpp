#include "bench/report.h"

#include <nlohmann/json.hpp>

#include <cerrno>
#include <cstring>

namespace kestrel::bench {

namespace {

std::string fixed(double value, int decimals) {
  char text[64];
  std::snprintf(text, sizeof(text), "%.*f", decimals, value);
  return text;
}

std::string gb(size_t bytes) {
  return fixed(double(bytes) / 1e9, 4);
}

}  // namespace

const std::vector<std::string>& csv_columns() {
  static const std::vector<std::string> columns = {
      "model",
      "1st token avg latency (ms)",
      "2+ avg latency (ms/token)",
      "encoder time (ms)",
      "input/output tokens",
      "batch_size",
      "actual input/output tokens",
      "num_beams",
      "low_bit",
      "model loading time (s)",
      "peak mem (GB)",
      "decode tok/s",
      "achieved GB/s",
      "roofline %",
      "planned mem (GB)",
      "status",
      "device",
      "commit",
  };
  return columns;
}

std::vector<std::string> csv_fields(const CaseResult& r) {
  const BenchCase& c = r.bench_case;
  const bool timed = r.has_timings;
  const bool next = timed && r.has_next_token;
  return {
      c.model,
      timed ? fixed(r.first_token_ms, 2) : "",
      next ? fixed(r.next_token_ms, 2) : "",
      // Decoder-only models have no encoder; the all-in-one benchmark reports 0 for them too.
      timed ? "0.00" : "",
      InOut{c.in_len, c.out_len}.text(),
      std::to_string(c.batch_size),
      timed ? std::to_string(r.actual_in) + "-" + std::to_string(r.actual_out) : "",
      std::to_string(c.num_beams),
      format_name(c.format),
      timed ? fixed(r.load_seconds, 2) : "",
      timed ? gb(r.peak_bytes) : "",
      next ? fixed(r.decode_tps, 2) : "",
      next ? fixed(r.achieved_gbs, 2) : "",
      next ? fixed(r.roofline_pct, 1) : "",
      r.planned_bytes > 0 ? gb(r.planned_bytes) : "",
      r.status,
      r.device,
      r.commit,
  };
}

std::string csv_line(const std::vector<std::string>& fields) {
  std::string line;
  for (size_t i = 0; i < fields.size(); ++i) {
    if (i > 0) line += ',';
    const std::string& f = fields[i];
    if (f.find_first_of(",\"\r\n") == std::string::npos) {
      line += f;
      continue;
    }
    line += '"';
    for (char ch : f) {
      if (ch == '"') line += '"';
      line += ch;
    }
    line += '"';
  }
  return line + "\n";
}

Result<std::unique_ptr<CsvWriter>> CsvWriter::open(const std::string& path) {
  std::unique_ptr<CsvWriter> writer(new CsvWriter());
  if (path.empty() || path == "-") {
    writer->path_ = "standard output";
    writer->file_ = stdout;
  } else {
    writer->path_ = path;
    writer->file_ = std::fopen(path.c_str(), "w");
    if (writer->file_ == nullptr) {
      return Status::error(path + ": cannot write the results (" + std::strerror(errno) + ")");
    }
    writer->owned_ = true;
  }
  KS_RETURN_IF_ERROR(writer->write_line(csv_line(csv_columns())));
  return writer;
}

CsvWriter::~CsvWriter() {
  if (owned_ && file_ != nullptr) std::fclose(file_);
}

Status CsvWriter::write_line(const std::string& line) {
  if (std::fwrite(line.data(), 1, line.size(), file_) != line.size() || std::fflush(file_) != 0) {
    return Status::error(path_ + ": cannot write the results (" + std::strerror(errno) + ")");
  }
  return Status::ok();
}

Status CsvWriter::write(const CaseResult& result) {
  std::lock_guard<std::mutex> lock(mutex_);
  return write_line(csv_line(csv_fields(result)));
}

Result<std::string> render_quick(const std::vector<QuickRow>& rows, const std::string& format) {
  if (format == "json") {
    nlohmann::json array = nlohmann::json::array();
    for (const QuickRow& r : rows) {
      nlohmann::json j;
      j["model"] = r.model;
      j["low_bit"] = r.low_bit;
      j["size_gib"] = r.size_gib;
      j["params_b"] = r.params_b;
      j["backend"] = r.backend;
      j["threads"] = r.threads;
      j["batch_size"] = r.batch;
      j["test"] = r.test;
      j["status"] = r.status;
      if (r.ok) {
        j["tokens_per_second"] = r.tps_mean;
        j["tokens_per_second_stddev"] = r.tps_stddev;
      }
      if (r.ok && r.gbs >= 0) j["achieved_gbs"] = r.gbs;
      if (r.ok && r.tflops >= 0) j["achieved_tflops"] = r.tflops;
      if (r.ok && r.roofline_pct >= 0) j["roofline_percent"] = r.roofline_pct;
      array.push_back(j);
    }
    return array.dump(2) + "\n";
  }
  auto opt = [](bool ok, double value, int decimals) {
    return ok && value >= 0 ? fixed(value, decimals) : std::string("-");
  };
  const std::vector<std::string> header = {"model",   "low_bit", "size (GiB)", "params (B)",
                                           "backend", "threads", "batch",      "test",
                                           "t/s",     "GB/s",    "TFLOP/s",    "roofline %"};
  std::vector<std::vector<std::string>> table;
  for (const QuickRow& r : rows) {
    table.push_back({r.model, r.low_bit, fixed(r.size_gib, 2), fixed(r.params_b, 2), r.backend,
                     std::to_string(r.threads), std::to_string(r.batch), r.test,
                     r.ok ? fixed(r.tps_mean, 2) + " ± " + fixed(r.tps_stddev, 2) : "failed",
                     opt(r.ok, r.gbs, 1), opt(r.ok, r.tflops, 3), opt(r.ok, r.roofline_pct, 1)});
  }
  if (format == "csv") {
    std::vector<std::string> csv_header = header;
    csv_header[8] = "t/s";
    csv_header.insert(csv_header.begin() + 9, "t/s stddev");
    csv_header.push_back("status");
    std::string out = csv_line(csv_header);
    for (size_t i = 0; i < rows.size(); ++i) {
      std::vector<std::string> fields = table[i];
      fields[8] = rows[i].ok ? fixed(rows[i].tps_mean, 2) : "";
      fields.insert(fields.begin() + 9, rows[i].ok ? fixed(rows[i].tps_stddev, 2) : "");
      for (size_t f = 10; f < fields.size(); ++f) {
        if (fields[f] == "-") fields[f] = "";
      }
      fields.push_back(rows[i].status);
      out += csv_line(fields);
    }
    return out;
  }
  if (format != "md")
    return Status::error("-o: unknown output format '" + format + "' (md, csv or json)");
  // Text columns left-aligned, numbers right-aligned, as llama-bench prints them.
  const std::vector<bool> numeric = {false, false, true, true, false, true,
                                     true,  true,  true, true, true,  true};
  std::vector<size_t> width(header.size());
  for (size_t i = 0; i < header.size(); ++i) width[i] = header[i].size();
  auto display_width = [](const std::string& s) {
    size_t n = 0;
    for (unsigned char ch : s) n += (ch & 0xc0) != 0x80;  // count UTF-8 characters, not bytes
    return n;
  };
  for (const auto& row : table) {
    for (size_t i = 0; i < row.size(); ++i) width[i] = std::max(width[i], display_width(row[i]));
  }
  auto render_row = [&](const std::vector<std::string>& row) {
    std::string line = "|";
    for (size_t i = 0; i < row.size(); ++i) {
      const std::string pad(width[i] - display_width(row[i]), ' ');
      line += " " + (numeric[i] ? pad + row[i] : row[i] + pad) + " |";
    }
    return line + "\n";
  };
  std::string out = render_row(header);
  out += "|";
  for (size_t i = 0; i < header.size(); ++i) {
    out += " " + std::string(width[i] - (numeric[i] ? 1 : 0), '-') + (numeric[i] ? ":" : "") + " |";
  }
  out += "\n";
  for (const auto& row : table) out += render_row(row);
  return out;
}

}  // namespace kestrel::bench
