#pragma once
// Where a run's data comes from, and the rule that keeps a user's dataset safe: the built-in shapes world is
// generated into the data directory only when the config asks for it (data.generate) AND the directory is empty,
// absent, or was made by the generator (it holds the generator's shapes_world.json). Anything else with a missing
// file is an error naming the file — a mistyped or incomplete data directory is never filled with synthetic data.
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "app/run_config.hpp"
#include "cumo/core/error.hpp"
#include "cumo/data/shapes_world.hpp"

namespace cumo::app {

inline constexpr const char* kShapesMarker = "shapes_world.json";  // what write_shapes_world leaves in its directory

// Makes sure every file in `files` (relative to the data directory) is there, generating the shapes world when the
// rule above allows it. Returns true when it generated. One line goes to `log` when it generates (quiet or not:
// writing files is not progress output) and when existing files came from other generator settings.
inline bool ensure_data(const RunConfig& c, const std::vector<std::string>& files, std::ostream& log = std::cerr) {
  namespace fs = std::filesystem;
  std::vector<std::string> missing;
  for (const auto& f : files) {
    std::error_code ec;
    const std::string p = c.data_path(f);
    if (!fs::exists(p, ec)) {
      missing.push_back(p);
      continue;
    }
    CUMO_CHECK(fs::is_regular_file(p, ec), "data: '", p, "' is not a regular file");
  }
  const fs::path dir(c.data_dir), marker = dir / kShapesMarker;
  std::error_code ec;
  const bool made_by_generator = fs::is_regular_file(marker, ec);
  if (missing.empty()) {
    // Files from another generator setting would silently change the experiment: say so.
    if (made_by_generator && c.generate_data) {
      try {
        std::ifstream f(marker);
        const auto m = nlohmann::json::parse(f);
        if (m.value("seed", std::uint64_t(0)) != c.shapes.seed || m.value("train_images", 0) != c.shapes.train_images ||
            m.value("eval_images", 0) != c.shapes.eval_images || m.value("image_size", 0) != c.shapes.image_size)
          log << "note: " << c.data_dir << " was generated with other settings than data.generate asks for (seed "
              << m.value("seed", std::uint64_t(0)) << ", " << m.value("train_images", 0) << " train, "
              << m.value("eval_images", 0) << " eval, " << m.value("image_size", 0)
              << " px); using it as is — delete the directory to regenerate\n";
      } catch (const std::exception&) {
      }
    }
    return false;
  }
  std::string list;
  for (const auto& m : missing) list += (list.empty() ? "'" : ", '") + m + "'";
  CUMO_CHECK(c.generate_data, "data: ", list, missing.size() == 1 ? " does" : " do",
             " not exist, and the config has no data.generate, so nothing is generated: point data.dir at a "
             "LLaVA-format dataset that has these files, or add data.generate to build the shapes world there");
  const bool empty = !fs::exists(dir, ec) || (fs::is_directory(dir, ec) && fs::directory_iterator(dir, ec) ==
                                                                             fs::directory_iterator());
  CUMO_CHECK(!fs::exists(dir, ec) || fs::is_directory(dir, ec), "data: data.dir '", c.data_dir,
             "' exists and is not a directory");
  CUMO_CHECK(empty || made_by_generator, "data: ", list, missing.size() == 1 ? " is" : " are", " missing from '",
             c.data_dir, "', which holds other files and was not made by the shapes-world generator (no ",
             kShapesMarker, "): refusing to generate into it. Complete the dataset, or point data.dir at an empty "
             "or new directory to generate the shapes world there");
  log << "generating the shapes world in " << c.data_dir << " (seed " << c.shapes.seed << ", "
      << c.shapes.train_images << " train + " << c.shapes.eval_images << " eval images)\n";
  data::write_shapes_world(c.data_dir, c.shapes);
  for (const auto& f : files)
    CUMO_CHECK(fs::exists(c.data_path(f), ec), "data: '", c.data_path(f),
               "' is still missing after generating the shapes world (a file name the generator does not write?)");
  return true;
}

// The files a cumo_train run reads: each stage's data and the eval split.
inline std::vector<std::string> run_files(const RunConfig& c) {
  return {c.stages[0].data, c.stages[1].data, c.stages[2].data, c.eval_data};
}

}  // namespace cumo::app
