# ctest driver: install the built torch_ext into a scratch prefix, configure and build
# examples/cpp out of tree against it with find_package(TorchExt), run the training example,
# and (given PYTHON) export models in Python and run them with the C++ runner.
# Variables: TOP_BUILD, EXAMPLES_SOURCE, WORK, TORCH_PREFIX, GENERATOR, [PYTHON, REPO, LIBRARY].
file(REMOVE_RECURSE "${WORK}")
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  message(STATUS "${out}${err}")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}")
  endif()
endfunction()
run("${CMAKE_COMMAND}" --install "${TOP_BUILD}" --prefix "${WORK}/prefix")
run("${CMAKE_COMMAND}" -E env "CMAKE_PREFIX_PATH=${WORK}/prefix:${TORCH_PREFIX}"
    "${CMAKE_COMMAND}" -S "${EXAMPLES_SOURCE}" -B "${WORK}/build" -G "${GENERATOR}")
run("${CMAKE_COMMAND}" --build "${WORK}/build")
run("${WORK}/build/segmentation_train" 60)
if(PYTHON)
  run("${CMAKE_COMMAND}" -E env "PYTHONPATH=${REPO}" "TORCH_EXT_LIBRARY=${LIBRARY}"
      "${PYTHON}" "${EXAMPLES_SOURCE}/export_and_compare.py"
      --runner "${WORK}/build/run_exported" --work "${WORK}/exported")
endif()
