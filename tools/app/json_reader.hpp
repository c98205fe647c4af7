#pragma once
// Reading the applications' JSON config files: comments allowed, unknown keys refused, every value checked for its
// type and range with a message naming the file, the field and the value (a typo or a truncating conversion would
// otherwise silently keep a default or change a number).
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

#include <nlohmann/json.hpp>

#include "cumo/core/error.hpp"

namespace cumo::app {

// A JSON config file (// and /* */ comments allowed); errors name `who` and the path. Only regular files are read
// (a FIFO or a directory in its place is refused, not waited on).
inline nlohmann::json read_config_file(const std::string& path, const char* who);

// Reads j[key] into `v` when present, refusing a wrong type or a value `T` cannot hold exactly, naming the source
// and the key; records the key as known.
struct JsonReader {
  const nlohmann::json& j;
  std::string where;
  std::set<std::string> known;

  template <class T>
  void get(const char* key, T& v) {
    known.insert(key);
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) return;
    v = convert<T>(*it, key);
  }
  const nlohmann::json* object(const char* key) {
    known.insert(key);
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) return nullptr;
    CUMO_CHECK(it->is_object(), where, ": field '", key, "' must be an object, got ", it->dump());
    return &*it;
  }
  // Unknown keys are mistakes (a typo would silently keep a default), except "comment" / "_..." notes.
  void reject_unknown() const {
    for (const auto& [k, v] : j.items())
      if (!known.count(k) && k != "comment" && !k.starts_with("_")) fail(where, ": unknown field '", k, "'");
  }

  template <class T>
  T convert(const nlohmann::json& x, const std::string& key) const {
    if constexpr (std::is_same_v<T, bool>) {
      CUMO_CHECK(x.is_boolean(), where, ": field '", key, "' must be true or false, got ", x.dump());
      return x.get<bool>();
    } else if constexpr (std::is_integral_v<T>) {
      return integer<T>(x, key);
    } else if constexpr (std::is_floating_point_v<T>) {
      CUMO_CHECK(x.is_number(), where, ": field '", key, "' must be a number, got ", x.dump());
      const double d = x.get<double>();
      CUMO_CHECK(std::isfinite(d), where, ": field '", key, "' must be finite, got ", x.dump());
      return T(d);
    } else if constexpr (std::is_same_v<T, std::string>) {
      CUMO_CHECK(x.is_string(), where, ": field '", key, "' must be a string, got ", x.dump());
      return x.get<std::string>();
    } else {  // a list
      CUMO_CHECK(x.is_array(), where, ": field '", key, "' must be a list, got ", x.dump());
      T out;
      for (std::size_t i = 0; i < x.size(); ++i)
        out.push_back(convert<typename T::value_type>(x[i], key + "[" + std::to_string(i) + "]"));
      return out;
    }
  }

 private:
  // An integer JSON value, or a float that is exactly one (1e3); anything else — 2.5, 1e30, -1 for an unsigned
  // field, 99999999999999999999 — is refused with the value, never truncated or wrapped.
  template <class T>
  T integer(const nlohmann::json& x, const std::string& key) const {
    const char* kind = std::is_unsigned_v<T> ? "a non-negative integer" : "an integer";
    CUMO_CHECK(x.is_number(), where, ": field '", key, "' must be ", kind, ", got ", x.dump());
    if (x.is_number_unsigned()) {
      const std::uint64_t u = x.get<std::uint64_t>();
      CUMO_CHECK(u <= std::uint64_t(std::numeric_limits<T>::max()), where, ": field '", key, "' is ", x.dump(),
                 ", more than ", kind, " of this field can hold (", std::numeric_limits<T>::max(), ")");
      return T(u);
    }
    if (x.is_number_integer()) {
      const std::int64_t s = x.get<std::int64_t>();
      CUMO_CHECK(!(std::is_unsigned_v<T> && s < 0), where, ": field '", key, "' must be ", kind, ", got ", x.dump());
      CUMO_CHECK(std::is_unsigned_v<T> || (s >= std::int64_t(std::numeric_limits<T>::min()) &&
                                           s <= std::int64_t(std::numeric_limits<T>::max())),
                 where, ": field '", key, "' is ", x.dump(), ", outside what this field can hold");
      return T(s);
    }
    const double d = x.get<double>();
    CUMO_CHECK(std::isfinite(d) && d == std::floor(d), where, ": field '", key, "' must be ", kind, ", got ",
               x.dump());
    CUMO_CHECK(d >= double(std::numeric_limits<T>::min()) && d <= double(std::numeric_limits<T>::max()) &&
                   std::abs(d) < 9.007199254740992e15,  // 2^53: every integer below is exact in a double
               where, ": field '", key, "' is ", x.dump(), ", outside what this field can hold");
    return T(d);
  }
};

inline nlohmann::json read_config_file(const std::string& path, const char* who) {
  std::error_code ec;
  const auto st = std::filesystem::status(path, ec);
  CUMO_CHECK(!ec && std::filesystem::exists(st), who, ": cannot open '", path, "' (no such file)");
  CUMO_CHECK(std::filesystem::is_regular_file(st), who, ": '", path, "' is not a regular file");
  std::ifstream f(path);
  CUMO_CHECK(f, who, ": cannot open '", path, "'");
  try {
    return nlohmann::json::parse(f, nullptr, true, /*ignore_comments=*/true);
  } catch (const nlohmann::json::exception& e) {
    fail(who, ": '", path, "' is not valid JSON: ", e.what());
  }
}

}  // namespace cumo::app
